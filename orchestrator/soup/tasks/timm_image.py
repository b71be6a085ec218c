"""`timm_image`: image classification with any timm model.

Pretrained weights come from the hub when the machine is online (`pretrained: true`) or
from a local file (`pretrained_file:` a .safetensors / .pth state dict of the same
architecture); timm drops the old classifier and makes one for the user's labels.
Images are decoded per example with timm's standard transforms: for training, random
resized crop and flip, plus RandAugment when the `augment` hyperparameter is > 0 (its
magnitude, as in the model soups sweep); for evaluation, resize and center crop.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.common.errors import ConfigError
from orchestrator.soup.tasks.base import Examples, Inputs
from orchestrator.soup.tasks.user_data import DATA_DEFAULTS, FileTask


class ImageExamples(Examples):
    """Images as paths or encoded bytes, decoded and transformed one example at a time."""

    def __init__(self, sources: list, labels: torch.Tensor, transform):
        self.sources, self.labels, self.transform = sources, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.sources[i])), self.labels[i]

    def with_transform(self, transform) -> "ImageExamples":
        return ImageExamples(self.sources, self.labels, transform)


def load_image(source):
    from PIL import Image

    if isinstance(source, dict):  # Hugging Face datasets store images as {"bytes": ..., "path": ...}
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, np.ndarray):
        return Image.fromarray(source.astype(np.uint8)).convert("RGB")
    with Image.open(source) as im:
        return im.convert("RGB")


class TimmImageTask(FileTask):
    name = "timm_image"
    defaults = {
        "model": "resnet18",  # any timm model name
        "pretrained": True,  # timm's pretrained weights (from the hub unless pretrained_file is set)
        "pretrained_file": "",  # a local state dict (timm's layout, original classifier) instead of the hub
        "image_size": 0,  # 0 = the model's own input size
        "head_init": "probe",  # probe: logistic regression on frozen features; zero: zero weights
        "probe_C": 1.0,
        "probe_examples": 0,  # fit the probe on this many training examples (seeded); 0 = all
        "num_workers": 0,  # DataLoader processes decoding images (set to the trial's CPUs minus one)
        "data": {**DATA_DEFAULTS, "input_column": "image"},
    }
    pretrain_settings = ("model", "pretrained", "pretrained_file", "image_size", "head_init", "probe_C",
                         "probe_examples", "data")

    def __init__(self, settings=None):
        super().__init__(settings)
        import timm

        if not timm.list_models(self.settings["model"]) and not timm.is_model(self.settings["model"]):
            raise ValueError(f"model: unknown timm model {self.settings['model']!r}")
        f = self.settings["pretrained_file"]
        if f and not os.path.isfile(os.path.expanduser(f)):
            raise ValueError(f"pretrained_file: no such file: {f}")
        self.settings["pretrained_file"] = os.path.abspath(os.path.expanduser(f)) if f else ""
        self._data_config = None

    def _create(self, pretrained: bool) -> nn.Module:
        import timm

        kw: dict[str, Any] = {}
        if self.settings["image_size"] and "vit" in self.settings["model"]:
            kw["img_size"] = self.settings["image_size"]  # ViTs are built for one input size; convnets take any
        if not pretrained:
            return timm.create_model(self.settings["model"], num_classes=len(self.classes()), **kw)
        if self.settings["pretrained_file"]:
            kw["pretrained_cfg_overlay"] = {"file": self.settings["pretrained_file"]}
        try:
            # with its own classifier, so timm loads strictly (it loads a new-sized head leniently,
            # which would silently keep random weights for anything that does not match)
            model = timm.create_model(self.settings["model"], pretrained=True, **kw)
        except (OSError, RuntimeError, ValueError) as e:  # offline hub, or a file of another architecture
            raise ConfigError(f"task.model: cannot create {self.settings['model']!r} with pretrained weights: "
                              f"{str(e).strip().splitlines()[0][:200]}") from None
        model.reset_classifier(len(self.classes()))
        return model

    def build_model(self) -> nn.Module:
        return self._create(pretrained=False)

    def pretrained_model(self) -> nn.Module:
        return self._create(pretrained=self.settings["pretrained"])  # false: random init (tests, from scratch)

    def features(self, model: nn.Module, x: Inputs) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_classifier()

    def data_config(self) -> dict[str, Any]:
        """The model's input size, crop and normalisation (timm's pretrained config)."""
        if self._data_config is None:
            import timm.data

            cfg = timm.data.resolve_data_config({}, model=self.build_model())
            if self.settings["image_size"]:
                cfg["input_size"] = (3, self.settings["image_size"], self.settings["image_size"])
            self._data_config = cfg
        return self._data_config

    def transform(self, training: bool, randaugment: float = 0.0):
        import timm.data

        cfg = self.data_config()
        aa = f"rand-m{int(round(randaugment))}-mstd0.5" if training and randaugment > 0 else None
        return timm.data.create_transform(**cfg, is_training=training, auto_augment=aa)

    def _resolve_inputs(self, inputs: list, path: str) -> list:
        """Image paths in a table are relative to the table's folder."""
        base = os.path.dirname(os.path.abspath(path)) if "://" not in path else ""
        return [os.path.join(base, v) if isinstance(v, str) and base and not os.path.isabs(v) else v for v in inputs]

    def examples(self, inputs: list, labels: torch.Tensor) -> Examples:
        return ImageExamples(inputs, labels, self.transform(training=False))

    def train_examples(self, train: Examples, hp: dict[str, Any]) -> Examples:
        return train.with_transform(self.transform(training=True, randaugment=hp["augment"]))

    def serve_inputs(self, model_input: Any) -> torch.Tensor:
        """Image paths, encoded image bytes, or HxWx3 uint8 arrays."""
        if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
            model_input = model_input.iloc[:, 0]
        tf = self.transform(training=False)
        return torch.stack([tf(load_image(v)) for v in list(model_input)])

    def serve_example(self) -> list[bytes]:
        """Two small encoded PNG images (the eval transform resizes them): bytes travel to a server,
        where a path means nothing."""
        from PIL import Image

        ramp = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)
        images = []
        for pixels in (ramp, 255 - ramp):
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            images.append(out.getvalue())
        return images

    def serve_requirements(self) -> list[str]:
        return ["timm", "torchvision", "pillow"]

    def serve_settings(self) -> dict[str, Any]:
        # the soup's weights replace the pretrained ones: no hub download, no pretrained file to find
        return {**self.model_settings(), "pretrained": False, "pretrained_file": ""}
