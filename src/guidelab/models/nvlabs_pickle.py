"""NVlabs' network pickles (``torch_utils.persistence``) read without running anything from the file.

An NVlabs ``.pkl`` (edm2's published networks, ``reconstruct_phema.py`` output) is a dict whose
``ema`` entry is the network. Each persistent module is stored as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta = {type, version, module_src,
class_name, state}`` (``state``: the module's ``__dict__`` with ``_parameters``, ``_buffers``,
``_modules``, ``_init_args`` / ``_init_kwargs``); NVlabs' loader ``exec``s ``module_src``.

:class:`Unpickler` resolves only the globals in :data:`ALLOWED`, each to a harmless stand-in:
a persistent object becomes a :class:`Persistent` record of ``class_name`` and ``state`` (its
``module_src`` is kept as text, never executed, and no module named in the file is imported); a
tensor's storage bytes are read by ``torch.load(..., weights_only=True)``. Any other global is refused
with a GuidelabError naming it. :func:`read_network` returns ``class_name``'s ``_init_kwargs`` and the
tensors, from which :func:`guidelab.models.edm2.load_pkl` builds our network.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..errors import GuidelabError, check


class Persistent:
    """What ``_reconstruct_persistent_obj(meta)`` stands for: ``class_name``, ``state`` and the (unrun) ``module_src``."""

    def __init__(self, meta: dict):
        check(
            isinstance(meta, dict)
            and meta.get("type") == "class"
            and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict),
            "a torch_utils.persistence object must have type 'class', a class_name and a state dict",
        )
        self.class_name, self.state = meta["class_name"], meta["state"]
        self.module_src, self.version = meta.get("module_src"), meta.get("version")

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    def __repr__(self) -> str:
        return f"Persistent({self.class_name})"


class ModuleDict:
    """Stand-in for ``torch.nn.modules.container.ModuleDict``: records the pickled ``__dict__``."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a plain dict)."""


def _load_from_bytes(b: bytes) -> Any:
    check(isinstance(b, (bytes, bytearray)), "torch.storage._load_from_bytes needs bytes")
    return torch.load(io.BytesIO(b), weights_only=True)  # never unpickles arbitrary objects


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> torch.Tensor:
    check(isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)), "a tensor must be rebuilt from a storage")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data: object, requires_grad: bool = False, backward_hooks: object = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise GuidelabError("a parameter must be rebuilt from a tensor")
    return data


_NDARRAY = object()  # what "numpy.ndarray" resolves to: accepted by _reconstruct only, not callable


def _numpy_globals() -> dict:
    """numpy's array reconstruction: the latent encoder of a published network holds its per-channel
    scale and bias as numpy arrays (edm2 ``training/encoders.py``, ``StabilityVAEEncoder``)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]

    def reconstruct(subtype: object, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        check(subtype is _NDARRAY, "numpy arrays may only be rebuilt as numpy.ndarray")
        return np.ndarray.__new__(np.ndarray, shape, dtype)

    out = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")], out[(mod, "scalar")] = reconstruct, scalar
    return out


#: The globals an NVlabs network pickle references, each mapped to its stand-in.
ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): Persistent,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDict,
}


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED` (plus numpy array reconstruction)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        numpy = _numpy_globals() if module.startswith("numpy") else {}
        if (module, name) in numpy:
            return numpy[(module, name)]
        allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED)
        raise GuidelabError(f"refused global {module}.{name} in an NVlabs pickle; allowed: {allowed} and numpy arrays")

    def persistent_load(self, pid: Any) -> NoReturn:
        raise GuidelabError("refused a persistent id in an NVlabs pickle (NVlabs' network pickles use none)")


def read(path: str | os.PathLike) -> Any:
    """The unpickled contents of ``path``, persistent objects as :class:`Persistent` records."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return Unpickler(f).load()
    except OSError as e:
        raise GuidelabError(f"cannot read {path}: {e.strerror or e}") from None
    except GuidelabError as e:
        raise GuidelabError(f"{path}: {e}") from None
    except Exception as e:  # truncated or not a pickle
        raise GuidelabError(f"{path} is not a readable NVlabs pickle: {type(e).__name__}: {e}") from None


def _tensors(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten a module record into ``{dotted name: tensor}`` (parameters, buffers, submodules)."""
    state = obj.state if isinstance(obj, (Persistent, ModuleDict)) else None
    check(isinstance(state, dict), f"{prefix or 'the network'} is not a module record ({type(obj).__name__})")
    assert isinstance(state, dict)
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is not None:
                check(isinstance(t, torch.Tensor), f"{prefix}{name} is not a tensor")
                out[prefix + name] = t
    for name, sub in (state.get("_modules") or {}).items():
        if sub is not None:
            _tensors(sub, f"{prefix}{name}.", out)
    return out


#: Positional arguments of NVlabs' ``Precond`` in order (``_init_args``).
_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")


def network_record(path: str | os.PathLike, key: str = "ema") -> tuple[Persistent, dict]:
    """The ``Precond`` record stored under ``key`` in ``path``, and the whole unpickled dict."""
    data = read(path)
    check(isinstance(data, dict), f"{path} does not hold a dict of networks (got {type(data).__name__})")
    check(key in data, f"{path} has no {key!r} entry; it has {sorted(map(str, data))}")
    rec = data[key]
    check(
        isinstance(rec, Persistent) and rec.class_name == "Precond",
        f"{path}[{key!r}] is not an EDM2 Precond network (got {getattr(rec, 'class_name', type(rec).__name__)})",
    )
    return rec, data


def read_network(path: str | os.PathLike, key: str = "ema") -> tuple[dict, dict[str, torch.Tensor], dict]:
    """``(Precond kwargs, state dict, info)`` of the network under ``key``: kwargs from ``_init_args`` /
    ``_init_kwargs``, tensors under NVlabs' names; ``info`` records the source, the kwargs and the pickle's
    ``encoder`` (``{"class_name", "init_kwargs"}``: ``StandardRGBEncoder`` for pixels, ``StabilityVAEEncoder``
    for latents). :func:`guidelab.models.edm2.load_pkl` builds the network from them.
    """
    rec, data = network_record(path, key)
    args = tuple(rec.state.get("_init_args") or ())
    check(len(args) <= len(_PRECOND_ARGS), f"{path}: Precond takes at most {len(_PRECOND_ARGS)} positional arguments")
    kwargs = {**dict(zip(_PRECOND_ARGS, args)), **rec.init_kwargs}
    enc = data.get("encoder")
    encoder = {"class_name": enc.class_name, "init_kwargs": enc.init_kwargs} if isinstance(enc, Persistent) else None
    return kwargs, _tensors(rec, "", {}), {"source": str(path), "key": key, "nvlabs_kwargs": kwargs, "encoder": encoder}
