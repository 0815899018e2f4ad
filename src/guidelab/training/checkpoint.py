"""Checkpoints: tensors and a JSON config in ONE safetensors file (the JSON in the file's metadata).

Never pickle: loading a checkpoint only parses JSON and raw tensor bytes, and a model is rebuilt from
its config through the model registry. Writes are atomic (temporary file in the same folder, fsync,
``os.replace``), so a killed process leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .._io import atomic_write
from ..errors import GuidelabError
from ..models import registry

#: Metadata key under which the JSON config is stored.
CONFIG_KEY = "guidelab"


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Save ``tensors`` (moved to CPU, made contiguous) and the JSON-able ``config`` to ``path``."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    try:
        meta = json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GuidelabError(f"checkpoint config must be plain JSON: {e}") from None
    return atomic_write(path, safetensors.torch.save(tensors, metadata={CONFIG_KEY: meta}))  # one key: same bytes every time


def _header(data: bytes, path: Path) -> dict:
    """The safetensors JSON header, or a one-line GuidelabError saying why this is not safetensors."""
    bad = f"{path} is not a safetensors checkpoint"
    if len(data) < 8:
        raise GuidelabError(f"{bad} (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n == 0 or data[8:9] != b"{":
        hint = " (it looks like a pickle; guidelab never loads pickles)" if data[:1] == b"\x80" else ""
        raise GuidelabError(f"{bad}: bad header{hint}")
    try:
        return json.loads(data[8 : 8 + n])
    except ValueError:
        raise GuidelabError(f"{bad}: its header is not JSON") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, config)`` written by :func:`save`; anything else raises a one-line GuidelabError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GuidelabError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    header = _header(data, path)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # truncated or inconsistent file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GuidelabError(f"{path} is not a valid safetensors checkpoint: {first}") from None
    meta = (header.get("__metadata__") or {}).get(CONFIG_KEY)
    if meta is None:
        raise GuidelabError(f"{path} is a safetensors file without a guidelab config")
    try:
        config = json.loads(meta)
    except ValueError:
        raise GuidelabError(f"{path}: its guidelab config is not JSON") from None
    return {k: v.to(device) for k, v in tensors.items()}, config


def save_model(path: str | os.PathLike, model: torch.nn.Module, **info: Any) -> Path:
    """Save ``model``'s state and config (``{"model": <registry config>, **info}``)."""
    return save(path, dict(model.state_dict()), {"model": registry.config(model), **info})


def _check_sizes(path: str | os.PathLike, model_config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The config's network built on the meta device (no memory) must have the file's tensor shapes, so a
    config asking for more than the file holds (e.g. a huge ``hidden``) fails before anything is allocated."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in registry.build(model_config).state_dict().items()}
    except GuidelabError:
        raise
    except Exception:  # a model that cannot be built on meta: checked below
        return
    wrong = [k for k, v in shapes.items() if k in tensors and tuple(tensors[k].shape) != v]
    missing = [k for k in shapes if k not in tensors]
    if wrong or missing:
        k = (wrong or missing)[0]
        raise GuidelabError(
            f"{path} does not match its model config: {k} is {list(shapes[k])} in the config, "
            f"{list(tensors[k].shape) if k in tensors else 'absent'} in the file"
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model from a checkpoint: eval mode, parameters with ``requires_grad=False``.

    Works for model checkpoints (:func:`save_model`, EMA snapshots) and training states (the
    network's weights).
    """
    tensors, config = load(path, device)
    if config.get("kind") == "state":  # a training state: use the network's weights
        tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("net/")}
    if not isinstance(config.get("model"), dict):
        raise GuidelabError(f"{path} holds no model config")
    _check_sizes(path, config["model"], tensors)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise GuidelabError(f"{path} holds non-finite weights (NaN or inf) in {bad[:4]}; it cannot be sampled")
    model = registry.build(config["model"]).to(device)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise GuidelabError(f"{path} does not match its model config: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise GuidelabError(f"{path} does not match its model config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.checkpoint_info = config  # type: ignore[assignment]  # dynamic attribute on nn.Module
    return model.eval().requires_grad_(False)
