"""The embedded default task: printed glyphs -> handwritten digits.

Shaped like CLIP -> ImageNet -> ImageNet variants, but offline and CPU-sized:
- pretraining: the 62 alphanumerics rendered from the TrueType fonts bundled with
  matplotlib, preprocessed like the UCI handwritten digits (32x32 binary bitmap,
  4x4 blocks counted -> 8x8 image of values 0..16); some font files are held out;
- the pretrained 62-way head is kept, so its digit logits are a zero-shot classifier;
- fine-tuning: scikit-learn's handwritten digits, split into train / val / id_test;
- OOD sets: digits in the held-out fonts, and the ID test images with noise,
  rotation and blur.
"""

from __future__ import annotations

import math
import os
import string

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.soup.tasks.base import StateDict, Task, TaskData

CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase  # digits first: 0..9
TEXT_FONTS = [
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10",
]


def font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def render_glyphs(fonts: list[str], chars: str, per_glyph: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render each (font, char) `per_glyph` times with random size, stroke, offset and tilt.

    Returns 8x8 images with values 0..16 (UCI digits preprocessing) and class indices into CHARS.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for font_name in fonts:
        path = os.path.join(font_dir(), font_name + ".ttf")
        faces = {size: ImageFont.truetype(path, size) for size in (40, 48, 56)}
        for ch in chars:
            for _ in range(per_glyph):
                canvas = Image.new("L", (112, 112))
                ImageDraw.Draw(canvas).text(
                    (28, 16), ch, font=faces[int(rng.choice([40, 48, 56]))], fill=255,
                    stroke_width=int(rng.integers(0, 4)), stroke_fill=255,
                )
                canvas = canvas.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
                images.append(_to_uci_8x8(canvas, rng))
                labels.append(CHARS.index(ch))
    return np.stack(images), np.array(labels)


def _to_uci_8x8(canvas, rng: np.random.Generator) -> np.ndarray:
    """Crop, scale into a 32x32 box (random size and offset), binarise, count 4x4 blocks."""
    from PIL import Image

    box = canvas.getbbox()
    glyph = canvas.crop(box)
    w, h = glyph.size
    target = int(rng.integers(24, 33))
    scale = target / max(w, h)
    glyph = glyph.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    w, h = glyph.size
    bitmap = Image.new("L", (32, 32))
    x0 = (32 - w) // 2 + int(rng.integers(-2, 3))
    y0 = (32 - h) // 2 + int(rng.integers(-2, 3))
    bitmap.paste(glyph, (min(max(x0, 0), 32 - w), min(max(y0, 0), 32 - h)))
    binary = (np.asarray(bitmap) > 100).astype(np.int64)
    return binary.reshape(8, 4, 8, 4).sum(axis=(1, 3))


class GlyphCNN(nn.Module):
    """Three 3x3 convolutions, no BatchNorm (running statistics do not soup)."""

    def __init__(self, width: int = 32, n_classes: int = len(CHARS)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def affine(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate (radians), scale and shift (fraction of the image) a batch of images."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-1, 2, dtype=x.dtype)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(k1, k1)
    return F.conv2d(x, (k / k.sum())[None, None], padding=1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0


class GlyphsTask(Task):
    name = "glyphs"
    defaults = {
        "width": 32,
        "held_out_fonts": ["cmtt10", "DejaVuSerif-BoldItalic", "STIXGeneralBolIta", "DejaVuSansMono-Oblique"],
        "pretrain_per_glyph": 24,
        "pretrain_epochs": 6,
        "pretrain_lr": 2.0e-3,
        "pretrain_seed": 0,
        "split_seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.3,
        "ood_font_per_digit": 15,
        "noise_std": 4.0,
        "rotate_degrees": 30.0,
        "blur_sigma": 1.0,
    }
    pretrain_settings = ("width", "held_out_fonts", "pretrain_per_glyph", "pretrain_epochs",
                         "pretrain_lr", "pretrain_seed")
    split_settings = ("split_seed", "val_fraction", "test_fraction")

    def __init__(self, settings=None):
        super().__init__(settings)
        unknown = sorted(set(self.settings["held_out_fonts"]) - set(TEXT_FONTS))
        if unknown:
            raise ValueError(f"held_out_fonts: unknown font {unknown[0]!r} (choose from {', '.join(TEXT_FONTS)})")

    def build_model(self) -> nn.Module:
        return GlyphCNN(self.settings["width"])

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)[:, :10]  # the digit rows of the 62-way pretrained head

    def augment(self, x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
        if strength <= 0:
            return x
        n = x.shape[0]
        u = lambda *shape: torch.rand(*shape, generator=gen) * 2 - 1  # noqa: E731
        angle = u(n) * math.radians(15) * strength
        scale = 1 + u(n) * 0.1 * strength
        shift = u(n, 2) * 0.15 * strength
        x = affine(x, angle, scale, shift)
        return (x + torch.randn(x.shape, generator=gen) * 0.05 * strength).clamp(0, 1)

    def serve_inputs(self, model_input) -> torch.Tensor:
        """8x8 images with values in [0, 1], as an array of shape (N, 64) or (N, 1, 8, 8) (a logged
        model's signature asks for float32 (N, 64), the shape of `serve_example`)."""
        return torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, 1, 8, 8)

    def serve_example(self) -> np.ndarray:
        """Three handwritten digits, flattened to (3, 64) float32: the signature's shape and type."""
        from sklearn.datasets import load_digits

        return (load_digits().images[:3].reshape(3, 64) / 16.0).astype(np.float32)

    def pretrain(self, data: TaskData | None = None) -> StateDict:
        """Pretraining on printed glyphs of the non-held-out fonts (it does not see `data`)."""
        s = self.settings
        fonts = [f for f in TEXT_FONTS if f not in s["held_out_fonts"]]
        images, labels = render_glyphs(fonts, CHARS, s["pretrain_per_glyph"], s["pretrain_seed"])
        x, y = to_tensor(images), torch.as_tensor(labels)
        torch.manual_seed(s["pretrain_seed"])
        model = self.build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=s["pretrain_lr"], weight_decay=1e-4)
        steps = s["pretrain_epochs"] * math.ceil(len(x) / 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["pretrain_lr"], total_steps=steps)
        gen = torch.Generator().manual_seed(s["pretrain_seed"])
        for _ in range(s["pretrain_epochs"]):
            for idx in torch.randperm(len(x), generator=gen).split(128):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    def data(self) -> TaskData:
        from sklearn.datasets import load_digits

        s = self.settings
        digits = load_digits()
        x, y = to_tensor(digits.images), torch.as_tensor(digits.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(s["split_seed"]))
        n_val, n_test = int(len(x) * s["val_fraction"]), int(len(x) * s["test_fraction"])
        val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
        x_test, y_test = x[test], y[test]

        gen = torch.Generator().manual_seed(s["split_seed"] + 1)
        n = len(x_test)
        noisy = (x_test + torch.randn(x_test.shape, generator=gen) * s["noise_std"] / 16).clamp(0, 1)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        rotated = affine(x_test, sign * math.radians(s["rotate_degrees"]), torch.ones(n), torch.zeros(n, 2))
        blurred = gaussian_blur(x_test, s["blur_sigma"])
        font_images, font_labels = render_glyphs(
            s["held_out_fonts"], string.digits, s["ood_font_per_digit"], s["split_seed"] + 2
        )
        evals = {
            "val": (x[val], y[val]),
            "id_test": (x_test, y_test),
            "ood_fonts": (to_tensor(font_images), torch.as_tensor(font_labels)),
            "ood_noise": (noisy, y_test),
            "ood_rotate": (rotated, y_test),
            "ood_blur": (blurred, y_test),
        }
        return TaskData(train=(x[train], y[train]), evals=evals,
                        ood=["ood_fonts", "ood_noise", "ood_rotate", "ood_blur"],
                        corruptions=["ood_noise", "ood_rotate", "ood_blur"])
