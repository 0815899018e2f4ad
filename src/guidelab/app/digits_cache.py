"""The digits classifiers behind the digits metrics and classifier guidance, trained on first use and
cached (:func:`digits_classifier`); the network itself is :mod:`guidelab.models.digits`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import check
from ..metrics.features import Extractor
from ..models.digits import DigitsClassifier, train_digits_classifier
from ..training.checkpoint import load_model, save_model


def default_path(*, noise_aware: bool = False, steps: int = 2000, seed: int = 0) -> Path:
    """Where :func:`digits_classifier` caches a classifier: ``$GUIDELAB_CACHE`` (default
    ``~/.cache/guidelab``) / ``digits-classifier[-noise]-s{steps}-seed{seed}.safetensors``."""
    root = Path(os.environ.get("GUIDELAB_CACHE", Path.home() / ".cache" / "guidelab"))
    return root / f"digits-classifier{'-noise' if noise_aware else ''}-s{steps}-seed{seed}.safetensors"


def digits_classifier(path: str | os.PathLike | None = None, *, noise_aware: bool = False, steps: int = 2000,
                      seed: int = 0, progress: bool = False) -> DigitsClassifier:
    """The digits classifier saved at ``path`` (default :func:`default_path`); when no file is there,
    train it (:func:`train_digits_classifier`, deterministic given ``seed``) and save it there atomically.
    The file is never downloaded: the data ships with scikit-learn."""
    path = Path(path) if path is not None else default_path(noise_aware=noise_aware, steps=steps, seed=seed)
    if path.exists():
        model = load_model(path)
        check(isinstance(model, DigitsClassifier), f"{path} holds a {type(model).__name__}, not a DigitsClassifier")
        check(model.noise_aware == noise_aware,
              f"{path} holds a {'noise-aware' if model.noise_aware else 'clean'} classifier; asked for noise_aware={noise_aware}")
        return model.eval().requires_grad_(False)
    if progress:
        print(f"training the digits classifier ({steps} steps, noise_aware={noise_aware}) -> {path}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(noise_aware=noise_aware)
    model = train_digits_classifier(model, steps=steps, seed=seed)
    save_model(path, model, recipe="digits-classifier", steps=steps, seed=seed)
    return model


def extractor(path: str | os.PathLike | None = None) -> Extractor:
    """Penultimate features (128-d) of the clean digits classifier at ``path`` (default: the cache, trained
    on first use); input [N, 1, 8, 8] in [-1, 1]."""
    return digits_classifier(path).extractor()
