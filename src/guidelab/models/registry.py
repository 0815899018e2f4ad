"""Model registry: a model is rebuilt from its JSON config, ``{"name": <registered name>, **kwargs}``.

Only registered classes can be built, so loading a checkpoint never imports or runs arbitrary code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import GuidelabError, check

_MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` buildable from ``{"name": name, ...}``.

    The class must define ``config() -> dict`` returning its constructor arguments (JSON types only).
    """

    def deco(cls: type) -> type:
        check(name not in _MODELS or _MODELS[name] is cls, f"model name {name!r} is already registered")
        _MODELS[name] = cls
        setattr(cls, "registry_name", name)  # noqa: B010  (a class attribute mypy cannot see)
        return cls

    return deco


def names() -> list[str]:
    return sorted(_MODELS)


def config(model: torch.nn.Module) -> dict[str, Any]:
    """The JSON config that :func:`build` turns back into an equal (untrained) ``model``."""
    name = getattr(type(model), "registry_name", None)
    check(name in _MODELS, f"{type(model).__name__} is not a registered model; registered: {names()}")
    return {"name": name, **model.config()}  # type: ignore[operator]  # registered classes define config()


def build(cfg: dict[str, Any]) -> torch.nn.Module:
    """Build a registered model from its config (see :func:`config`)."""
    check(
        isinstance(cfg, dict) and isinstance(cfg.get("name"), str),
        f"a model config must be a dict with a 'name' key, got {cfg!r:.200}",
    )
    kwargs = dict(cfg)
    name = kwargs.pop("name")
    check(name in _MODELS, f"unknown model {name!r}; registered: {names()}")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:  # unknown or missing keyword
        raise GuidelabError(f"bad config for model {name!r}: {e}") from None
