"""Training: checkpoints (safetensors + JSON), power-function EMA, a resumable loop, recipes.

Guidance distillation is :mod:`guidelab.training.distill` (it reads the guider registry, so this package
does not import it: the registry reads :mod:`guidelab.training.student` and :mod:`guidelab.training.gft`)."""

from . import phema
from .checkpoint import load, load_model, save, save_model
from .ema import PowerEMA, gamma_to_sigma_rel, power_beta, sigma_rel_to_gamma
from .images import ImageConfig, train_images
from .loop import LoopConfig, Trainer, snapshot_path, step_generator, train
from .toy import ToyConfig, toy_trainer, train_toy

__all__ = [
    "load",
    "load_model",
    "save",
    "save_model",
    "PowerEMA",
    "gamma_to_sigma_rel",
    "power_beta",
    "sigma_rel_to_gamma",
    "LoopConfig",
    "Trainer",
    "snapshot_path",
    "step_generator",
    "train",
    "ToyConfig",
    "toy_trainer",
    "train_toy",
    "ImageConfig",
    "train_images",
    "phema",
]
