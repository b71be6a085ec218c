"""An MLflow pyfunc model for souped weights, logged as "model from code".

MLflow stores this file, a safetensors weights file and the files the task reads when it
builds the model (hf_text: the model config and tokenizer), never a pickle. Loading
rebuilds the task's architecture from `model_config`, with every bundled setting pointing
at the model's own copy, and reads the weights:

    model = mlflow.pyfunc.load_model("models:/<registered name>@champion")  # or runs:/<run id>/model
    logits = model.predict(inputs)  # raw inputs (see the task's serve_inputs) -> (N, n_labels) logits
"""

import mlflow
import torch
from safetensors.torch import load_file


def bundled_settings(config: dict, artifacts: dict) -> dict:
    """The task settings with each bundled file's setting replaced by where MLflow put the copy
    (the paths the model was logged with may not exist on this machine)."""
    return {**config["settings"], **{key: artifacts[key] for key in config.get("files", [])}}


class SoupModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from orchestrator.soup.tasks import TASKS

        cfg = context.model_config
        self.task = TASKS[cfg["task"]](bundled_settings(cfg, context.artifacts))
        self.model = self.task.build_model()
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context, model_input, params=None):
        x = self.task.serve_inputs(model_input)
        with torch.no_grad():
            return self.task.logits(self.model, x).float().numpy()


mlflow.models.set_model(SoupModel())
