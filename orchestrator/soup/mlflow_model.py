"""An MLflow pyfunc model for souped weights, logged as "model from code".

MLflow stores this file and a safetensors weights file, never a pickle. Loading
rebuilds the task's architecture from `model_config` and reads the weights:

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    logits = model.predict(inputs)  # raw inputs (see the task's serve_inputs) -> (N, n_labels) logits
"""

import mlflow
import torch
from safetensors.torch import load_file


class SoupModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from orchestrator.soup.tasks import TASKS

        cfg = context.model_config
        self.task = TASKS[cfg["task"]](cfg["settings"])
        self.model = self.task.build_model()
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context, model_input, params=None):
        x = self.task.serve_inputs(model_input)
        with torch.no_grad():
            return self.task.logits(self.model, x).numpy()


mlflow.models.set_model(SoupModel())
