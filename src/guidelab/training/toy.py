"""The toy recipe: the autoguidance paper's 2-D models trained on the exact fractal tree
(Karras et al. 2024, ``toy_example.py``; methods.md §2.3).

Every batch is drawn from the *exact* noisy distribution ``p(x; sigma)`` and the target is the exact
score, so there is no data noise: exact-score matching. Default loss (``loss="score"``) is the
paper's, ``sigma^2 mean_dims(s_net - s_true)^2``, computed in score space. This is the paper's
recipe as published, and it avoids the float32 cancellation in ``D - D_true = sigma^2 (s - s_true)``
at small sigma that a loss on D suffers. ``loss="edm"`` is :func:`guidelab.denoisers.edm_loss`
against the exact denoiser: the same minimiser, weighted ``lambda = 1/c_out^2``, i.e. by an extra
``1 + sigma^2 / sigma_data^2``; it is the natural choice for ``output="denoiser"``, whose score
``(D - x) / sigma^2`` has that cancellation itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .. import fused
from ..denoisers import edm_loss
from ..errors import GuidelabError, check
from ..log import get_logger
from ..models.mlp import ToyMLP
from ..toy import tree
from .loop import LoopConfig, Trainer, train

log = get_logger(__name__)

LOSSES = ("score", "edm")


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines a toy model; defaults are the paper's main model."""

    classes: str = "A"  # tree classes: "A", "B" or "AB" (AB = the unconditional data)
    hidden: int = 64
    depth: int = 4
    output: str = "energy"  # ToyMLP output: "energy" (the paper's) or "denoiser"
    sigma_data: float = 0.5
    loss: str = "score"
    P_mean: float = -2.3  # ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.5
    batch: int = 4096
    iters: int = 4096
    lr: float = 0.01
    lr_ref_steps: int = 512
    betas: tuple[float, float] = (0.9, 0.99)
    ema: tuple[float, ...] = (0.010,)
    snapshot_every: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.classes in ("A", "B", "AB"), f"unknown tree classes {self.classes!r}; allowed: 'A', 'B', 'AB'")
        check(self.loss in LOSSES, f"unknown loss {self.loss!r}; allowed: {list(LOSSES)}")
        check(self.P_std > 0, f"P_std must be > 0, got {self.P_std!r}")
        self.loop()  # validates the optimisation settings

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToyConfig":
        """Inverse of ``asdict`` (e.g. ``checkpoint_info["meta"]`` of a toy checkpoint)."""
        names = {f.name for f in fields(cls)}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**d)

    def model(self) -> dict[str, Any]:
        return {
            "name": "ToyMLP",
            "dim": 2,
            "hidden": self.hidden,
            "depth": self.depth,
            "sigma_data": self.sigma_data,
            "num_classes": 0,
            "output": self.output,
            "noise_cond": True,
        }

    def loop(self) -> LoopConfig:
        return LoopConfig(
            iters=self.iters,
            batch=self.batch,
            lr=self.lr,
            lr_ref_steps=self.lr_ref_steps,
            betas=self.betas,
            ema=self.ema,
            snapshot_every=self.snapshot_every,
            seed=self.seed,
        )

    def name(self) -> str:
        """Run folder name: readable fields plus a hash of the whole config."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"toy-{self.classes}-{self.output}-h{self.hidden}-i{self.iters}-{digest}"


#: ``fuse=None`` (auto) fuses a run of at least this many samples (iters x batch): 2048 steps at batch 4096,
#: where the ~3 ms saved per step outweighs the first compile (~5-15 s).
FUSE_MIN_SAMPLES = 2**23


@dataclass(frozen=True)
class ToyLoss:
    """The loss function of the recipe: ``self(net, batch, generator) -> [batch]``; a
    :class:`~guidelab.training.prefetch.SplitLoss`, since its batch (exact noisy samples and their exact score
    or denoiser) does not depend on the network. ``fuse``: the exact score as one compiled kernel
    (``GaussianMixture.score_fast(fused=True)``, :mod:`guidelab.fused`)."""

    cfg: ToyConfig
    fuse: bool = False

    def data(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        cfg, world = self.cfg, tree(self.cfg.classes)
        sigma = (torch.randn(batch, generator=gen) * cfg.P_std + cfg.P_mean).exp()
        x = world.sample(batch, sigma, generator=gen)  # exact samples of p(x; sigma)
        if cfg.loss == "score":  # score_fast: the exact score, ~3x cheaper on the tree (toy/mixture.py)
            return x, sigma, world.score_fast(x, sigma, fused=self.fuse)
        return x, sigma, world.denoise(x, sigma)

    def loss(self, net: nn.Module, *data: torch.Tensor) -> torch.Tensor:
        x, sigma, target = data
        net = cast(ToyMLP, net)  # the recipe's model (cfg.model())
        if self.cfg.loss == "score":
            return sigma**2 * (net.score(x, sigma) - target).square().mean(1)
        return edm_loss(net, x, sigma, target, net.precond)

    def __call__(self, net: nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss(net, *self.data(batch, gen))


def toy_loss(cfg: ToyConfig, *, fuse: bool = False) -> ToyLoss:
    """The loss function of the recipe (:class:`ToyLoss`): ``loss_fn(net, batch, generator) -> [batch]``."""
    return ToyLoss(cfg, fuse)


def fuse_for(cfg: ToyConfig, fuse: bool | None = False) -> bool:
    """Whether a run of ``cfg`` fuses its exact score (:func:`guidelab.fused.resolve`): ``None`` (auto) fuses the
    score loss of a run of at least :data:`FUSE_MIN_SAMPLES` samples when a C++ compiler is found."""
    if fuse and cfg.loss != "score":
        raise GuidelabError(f"fuse applies to the score loss (its exact score); loss={cfg.loss!r} has no fused kernel")
    return fused.resolve(fuse, worth=cfg.loss == "score" and cfg.iters * cfg.batch >= FUSE_MIN_SAMPLES)


def toy_trainer(cfg: ToyConfig, *, fuse: bool | None = False) -> Trainer:
    """A fresh :class:`Trainer` for ``cfg`` (benchmarks step it directly); ``fuse`` as in :func:`train_toy`."""
    return Trainer(cfg.model(), toy_loss(cfg, fuse=fuse_for(cfg, fuse)), cfg.loop())


def train_toy(
    out_dir: str | Path = "runs/toy",
    classes: str = "A",
    hidden: int = 64,
    iters: int = 4096,
    *,
    progress: bool = True,
    checkpoint_every: int = 256,
    threads: int | None = None,
    fuse: bool | None = False,
    prefetch: bool | None = None,
    **overrides: Any,
) -> Path:
    """Train a toy model (or resume it, or reuse a finished run) and return its final EMA snapshot.

    The run lives in ``out_dir/<ToyConfig.name()>``; ``overrides`` are other :class:`ToyConfig`
    fields. Load the result with :func:`guidelab.training.load_model`. ``threads``: torch CPU threads
    while training (``None``: torch's setting, all cores; a step at batch 4096 took 27 ms on 2 threads
    and 41 ms on 1 on a quiet 2-core machine). On a machine busy with other jobs, ``threads=1`` avoids
    threads waiting on each other, which can make each step many times slower (docs/BENCHMARKS.md).
    ``fuse``: compute the exact target score as one compiled kernel (:mod:`guidelab.fused`; a step at batch
    4096 ~12 % faster, after a first compile of ~5-15 s; raises if no C++ compiler is found); ``None`` (auto)
    fuses runs of at least :data:`FUSE_MIN_SAMPLES` samples when a compiler is found (``GUIDELAB_FUSE=0``:
    never). Off by default: fused and plain runs agree to float rounding, not bit for bit, and a machine
    without a compiler could not reproduce a fused run's numbers. Not part of the run's identity: a finished
    run is reused either way. ``prefetch``: the exact samples and targets computed in a second process, a few
    steps ahead of the network (bit-identical weights; :func:`guidelab.training.train`); ``None`` (auto): when
    a core is free for it and the run is long enough.
    """
    names = {f.name for f in fields(ToyConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise GuidelabError(f"unknown toy config fields {unknown}; allowed: {sorted(names)}")
    cfg = ToyConfig(classes=classes, hidden=hidden, iters=iters, **overrides)
    fuse = fuse_for(cfg, fuse)
    if fuse:
        log.info("toy %s h%d: exact score fused (torch.compile; the first compile takes ~5-15 s)", cfg.classes, cfg.hidden)
    return train(
        Path(out_dir) / cfg.name(),
        cfg.model(),
        toy_loss(cfg, fuse=fuse),
        cfg.loop(),
        meta={"recipe": "toy", **asdict(cfg)},
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=f"toy {cfg.classes} h{cfg.hidden}",
        threads=threads,
        prefetch=prefetch,
    )
