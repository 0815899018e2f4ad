"""Networks. Every model is a denoiser ``D(x, sigma, **cond)`` and is rebuilt from its JSON config."""

from . import edm2  # noqa: F401  (registers "EDM2"; guidelab.models.edm2)
from .classifier import ExactClassifier, ToyClassifier, train_tree_classifier, tree_classifier
from .digits import DigitsClassifier, train_digits_classifier
from .image import PixelMLP, UNet
from .mlp import MPLinear, ToyMLP, mp_normalize, mp_silu
from .registry import build, config, names, register

__all__ = [
    "ToyClassifier",
    "ExactClassifier",
    "tree_classifier",
    "train_tree_classifier",
    "ToyMLP",
    "PixelMLP",
    "UNet",
    "DigitsClassifier",
    "train_digits_classifier",
    "MPLinear",
    "mp_normalize",
    "mp_silu",
    "build",
    "config",
    "names",
    "register",
]
