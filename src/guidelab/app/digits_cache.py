"""The digits classifiers behind the digits metrics and classifier guidance (:func:`digits_classifier`);
the network itself is :mod:`guidelab.models.digits`.

The clean classifier behind every digits FD / accuracy and its noise-aware twin behind digits classifier
guidance ship inside the package (``guidelab/assets/``, produced by
:func:`~guidelab.models.digits.train_digits_classifier` with the defaults, steps=2000, seed=0); their file
sha256 are pinned here (:data:`SHIPPED_SHA256`, :data:`SHIPPED_NOISE_SHA256`) and checked at load, so every
machine computes the same features and the same guidance. Any other classifier (other steps or seed, or
``train=True``) is trained locally on first use and cached; its hash is logged and recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import GuidelabError, check
from ..log import get_logger
from ..metrics.features import Extractor, sha256
from ..models.digits import DigitsClassifier, train_digits_classifier
from ..training.checkpoint import load_model, save_model

log = get_logger(__name__)
#: The shipped clean classifier (steps=2000, seed=0) and the sha256 of its file.
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "digits-classifier-s2000-seed0.safetensors"
SHIPPED_SHA256 = "ac62509eea12a4d0ef12fdb7c1df5c4214cf11ba6e89f344ca8e1e7c118ffbf1"
#: sha256 of its weights (:meth:`DigitsClassifier.weights_sha256`), what metrics record.
SHIPPED_WEIGHTS_SHA256 = "c3fed6717daecfabd4bc2f12da063243e357afcfd6bf7c885955b1ab93256077"
#: The shipped noise-aware classifier (p(y | x; sigma), steps=2000, seed=0), its file and weights sha256.
SHIPPED_NOISE = SHIPPED.with_name("digits-classifier-noise-s2000-seed0.safetensors")
SHIPPED_NOISE_SHA256 = "8fbe2f4f908cb449a5cae9e7c45fdfc77cf55d442474a13398fcc5acaaa5d598"
SHIPPED_NOISE_WEIGHTS_SHA256 = "f77903318cafe97fbc3b1cffb1db8fb73a41e65e7fa1dde1db2b426d5b73f2ea"


def shipped_classifier(
    path: str | os.PathLike | None = None, expected: str | None = None, *, noise_aware: bool = False
) -> DigitsClassifier:
    """The packaged clean (or ``noise_aware``) classifier; its file must hash to ``expected`` (default: the
    pinned value; a mismatch is an error)."""
    path = Path(path) if path is not None else (SHIPPED_NOISE if noise_aware else SHIPPED)
    expected = expected if expected is not None else (SHIPPED_NOISE_SHA256 if noise_aware else SHIPPED_SHA256)
    check(path.is_file(), f"the packaged digits classifier is missing ({path}); reinstall guidelab")
    got = sha256(path)
    if got != expected:
        raise GuidelabError(
            f"the packaged digits classifier {path} has sha256 {got[:12]}..., expected {expected[:12]}...; "
            "reinstall guidelab (or pass a classifier path / train=True to use your own)"
        )
    return _load(path, noise_aware=noise_aware)


def _load(path: Path, *, noise_aware: bool) -> DigitsClassifier:
    model = load_model(path)
    check(isinstance(model, DigitsClassifier), f"{path} holds a {type(model).__name__}, not a DigitsClassifier")
    check(
        model.noise_aware == noise_aware,
        f"{path} holds a {'noise-aware' if model.noise_aware else 'clean'} classifier; asked for noise_aware={noise_aware}",
    )
    return model.eval().requires_grad_(False)


def default_path(*, noise_aware: bool = False, steps: int = 2000, seed: int = 0) -> Path:
    """Where :func:`digits_classifier` caches a classifier: ``$GUIDELAB_CACHE`` (default
    ``~/.cache/guidelab``) / ``digits-classifier[-noise]-s{steps}-seed{seed}.safetensors``."""
    root = Path(os.environ.get("GUIDELAB_CACHE", Path.home() / ".cache" / "guidelab"))
    return root / f"digits-classifier{'-noise' if noise_aware else ''}-s{steps}-seed{seed}.safetensors"


def digits_classifier(
    path: str | os.PathLike | None = None,
    *,
    noise_aware: bool = False,
    steps: int = 2000,
    seed: int = 0,
    train: bool = False,
    progress: bool = False,
) -> DigitsClassifier:
    """The digits classifier saved at ``path``. Without ``path``: the packaged one
    (:func:`shipped_classifier`, clean or noise-aware) for the defaults unless ``train``, else the cache
    (:func:`default_path`). A missing file is trained (:func:`train_digits_classifier`, deterministic given
    ``seed``), saved atomically with its weights hash, and the hash logged. Nothing is downloaded.
    ``progress`` is accepted for old callers; progress goes to the ``guidelab`` logger."""
    if path is None and not train and (steps, seed) == (2000, 0):
        return shipped_classifier(noise_aware=noise_aware)
    path = Path(path) if path is not None else default_path(noise_aware=noise_aware, steps=steps, seed=seed)
    if path.exists():
        return _load(path, noise_aware=noise_aware)
    log.info(
        "training the digits classifier (first use, %d steps, noise_aware=%s, ~%d s) -> %s",
        steps,
        noise_aware,
        max(1, round(steps * (0.1 if noise_aware else 0.05))),
        path,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(noise_aware=noise_aware)
    model = train_digits_classifier(model, steps=steps, seed=seed)
    digest = model.weights_sha256()
    save_model(path, model, recipe="digits-classifier", steps=steps, seed=seed, weights_sha256=digest)
    log.info("digits classifier saved to %s (weights sha256 %s, file sha256 %s)", path, digest, sha256(path))
    return model


def extractor(path: str | os.PathLike | None = None) -> Extractor:
    """Penultimate features (128-d) of the clean digits classifier at ``path`` (default: the packaged
    one); input [N, 1, 8, 8] in [-1, 1]."""
    return digits_classifier(path).extractor()
