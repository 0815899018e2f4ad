"""A generic, resumable training loop: Adam, inverse-sqrt learning rate, power-function EMA,
EMA snapshots and training states as safetensors, a progress bar with the loss.

Reproducibility: the randomness of step ``i`` comes from a generator seeded by ``(seed, i)`` alone and
the network is initialised from ``seed``, so a run killed at any point and resumed from its last
training state ends with exactly the weights of an uninterrupted run (same device, same threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
from tqdm.auto import tqdm

from .._io import stale_temps
from ..errors import GuidelabError, check
from ..log import get_logger
from ..models import registry
from ..rng import step_generator
from . import checkpoint
from .ema import PowerEMA
from .prefetch import Prefetcher, SplitLoss, spare_core_pays

#: ``loss_fn(net, batch, generator) -> loss`` per sample [batch] (or a scalar); all randomness from
#: ``generator``.
LossFn = Callable[[torch.nn.Module, int, torch.Generator], torch.Tensor]

STATE_FILE = "state.safetensors"
log = get_logger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings. ``lr(step) = lr / sqrt(max(step / lr_ref_steps, 1))`` (EDM2's inverse-square-root decay)."""

    iters: int = 4096
    batch: int = 4096
    lr: float = 0.01
    lr_ref_steps: int = 512
    betas: tuple[float, float] = (0.9, 0.99)
    ema: tuple[float, ...] = (0.010,)  # sigma_rel of each power-function EMA profile
    snapshot_every: int = 256  # EMA snapshots (every profile) every this many steps
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters", "batch", "lr_ref_steps", "snapshot_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas!r}",
        )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "ema", tuple(float(s) for s in self.ema))

    def lr_at(self, step: int) -> float:
        """Learning rate of the 0-based ``step``."""
        return self.lr / math.sqrt(max(step / self.lr_ref_steps, 1))


_HEAP_KEPT = False


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MiB in the heap (Linux; a no-op elsewhere).

    By default glibc hands every freed block over 128 KiB back to the OS, so each CPU training step
    page-faults its activations in anew; keeping them makes a toy step about a quarter faster. This
    is process-wide (``mallopt``) and only changes when memory is returned to the OS.
    """
    global _HEAP_KEPT
    if _HEAP_KEPT or not sys.platform.startswith("linux"):
        return
    _HEAP_KEPT = True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MiB of free heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: leave the setting alone)."""
    if n is None:
        yield
        return
    check(isinstance(n, int) and n >= 1, f"threads must be an integer >= 1, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def snapshot_path(run_dir: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / f"ema-{step:07d}-{sigma_rel:g}.safetensors"


@dataclass
class Trainer:
    """The state of one training run and its step; :func:`train` drives it (also used by benchmarks)."""

    model_config: dict
    loss_fn: LossFn
    loop: LoopConfig
    device: str = "cpu"
    step: int = 0
    losses: list = field(default_factory=list)
    init: dict | None = None  # optional initial network weights (a state dict), e.g. a teacher's

    def __post_init__(self) -> None:
        if torch.device(self.device).type == "cpu":
            keep_freed_memory()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.loop.seed)
            net = registry.build(self.model_config)
        if self.init is not None:
            net.load_state_dict(self.init)
        self.net = net.to(self.device).train().requires_grad_(True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.loop.lr, betas=self.loop.betas)
        self.ema = PowerEMA(self.net, self.loop.ema)

    def train_step(self, data: tuple[torch.Tensor, ...] | None = None) -> float:
        """One optimiser step (step ``self.step``), then the EMA update; returns the mean loss. ``data``: this
        step's batch computed elsewhere (a :class:`~guidelab.training.prefetch.SplitLoss`'s ``data``)."""
        for group in self.opt.param_groups:
            group["lr"] = self.loop.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        if data is None:
            loss = self.loss_fn(self.net, self.loop.batch, step_generator(self.loop.seed, self.step, self.device)).mean()
        else:
            loss = cast(SplitLoss, self.loss_fn).loss(self.net, *(t.to(self.device) for t in data)).mean()
        loss.backward()
        self.opt.step()
        self.step += 1
        self.ema.update(self.net, self.step)
        value = loss.item()
        self.losses.append(value)
        return value

    # ------------------------------------------------------------------------------------------
    # Training state <-> tensors + JSON (no pickle).

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt = self.opt.state_dict()
        tensors = {f"net/{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        for idx, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt/{idx}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        tensors["log/loss"] = torch.tensor(self.losses, dtype=torch.float64)
        return tensors, {"step": self.step, "opt_groups": opt["param_groups"]}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v
        groups = [dict(g, betas=tuple(g["betas"])) for g in info["opt_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(info["step"])
        self.losses = tensors["log/loss"].tolist()


def _canon(obj: object) -> str:
    return json.dumps(obj, sort_keys=True)


def train(
    run_dir: str | Path,
    model_config: dict,
    loss_fn: LossFn,
    loop: LoopConfig,
    *,
    meta: dict | None = None,
    checkpoint_every: int = 256,
    progress: bool = True,
    desc: str = "train",
    device: str = "cpu",
    threads: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    init: dict | None = None,
    prefetch: bool | None = False,
) -> Path:
    """Train (or resume, or reuse) the run in ``run_dir``; return the final EMA snapshot's path.

    Files in ``run_dir``: ``state.safetensors`` (network, EMA, Adam state, loss log; written every
    ``checkpoint_every`` steps and at the end) and ``ema-<step>-<sigma_rel>.safetensors`` snapshots
    (every ``loop.snapshot_every`` steps and at the end), each loadable with
    :func:`checkpoint.load_model`. ``meta`` (JSON, e.g. the recipe config) is stored in every file;
    a run dir holding another config raises instead of being overwritten. ``threads``: torch CPU
    threads while training (``None``: unchanged; a resumed run is bit-identical only with the same
    count). ``on_step(step, loss)`` is called after each step and its saves. ``init``: the network's
    starting weights (a state dict; default: a fresh init from ``loop.seed``); name their source in
    ``meta``, since a resumed run does not compare them. ``prefetch``: compute the batches of a
    :class:`~guidelab.training.prefetch.SplitLoss` in a second process, a few steps ahead (bit-identical
    weights; CPU only); ``None`` (auto): when the machine has a core to spare (twice the training's threads)
    and at least :data:`~guidelab.training.prefetch.PREFETCH_MIN_SAMPLES` samples are left
    (``GUIDELAB_PREFETCH=0``: never).
    """
    with torch_threads(threads):
        return _train(
            run_dir, model_config, loss_fn, loop, meta, checkpoint_every, progress, desc, device, on_step, init, prefetch
        )


def use_prefetch(prefetch: bool | None, loss_fn: LossFn, loop: LoopConfig, device: str, steps_left: int) -> bool:
    """Whether :func:`train` computes the batches in a worker process (its ``prefetch`` argument resolved)."""
    check(prefetch in (None, True, False), f"prefetch must be True, False or None (auto), got {prefetch!r}")
    if prefetch is False or steps_left <= 0:
        return False
    cpu = torch.device(device).type == "cpu"
    if prefetch:
        if not isinstance(loss_fn, SplitLoss) or not cpu:
            raise GuidelabError(
                f"prefetch needs a loss with separate data and loss parts (a SplitLoss, e.g. the toy recipe's) "
                f"trained on the CPU; got {type(loss_fn).__name__} on {device!r}"
            )
        return True
    return isinstance(loss_fn, SplitLoss) and cpu and spare_core_pays(steps_left * loop.batch)


def _train(
    run_dir: str | Path,
    model_config: dict,
    loss_fn: LossFn,
    loop: LoopConfig,
    meta: dict | None,
    checkpoint_every: int,
    progress: bool,
    desc: str,
    device: str,
    on_step: Callable[[int, float], None] | None,
    init: dict | None = None,
    prefetch: bool | None = False,
) -> Path:
    check(isinstance(checkpoint_every, int) and checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
    run_dir = Path(run_dir)
    identity = {"model": model_config, "loop": asdict(loop), "meta": meta}
    final = snapshot_path(run_dir, loop.iters, loop.ema[0])
    state_path = run_dir / STATE_FILE
    for tmp in stale_temps(run_dir) if run_dir.is_dir() else ():  # atomic_write temps of a killed writer
        tmp.unlink(missing_ok=True)
    trainer = None
    if state_path.exists():
        tensors, info = checkpoint.load(state_path, device)
        if _canon({k: info.get(k) for k in identity}) != _canon(identity):
            raise GuidelabError(f"{run_dir} holds a run with another config; delete it or use another folder")
        if info["step"] >= loop.iters and final.exists():
            return final  # finished: reuse
        trainer = Trainer(model_config, loss_fn, loop, device)
        trainer.load_state(tensors, info)
    trainer = trainer or Trainer(model_config, loss_fn, loop, device, init=init)

    def save_state() -> None:
        tensors, info = trainer.state()
        checkpoint.save(state_path, tensors, {"kind": "state", **identity, **info})

    def save_snapshots() -> None:
        for i, (sigma_rel, gamma) in enumerate(zip(trainer.ema.sigma_rels, trainer.ema.gammas)):
            checkpoint.save(
                snapshot_path(run_dir, trainer.step, sigma_rel),
                trainer.ema.model_state(trainer.net, i),
                {"kind": "ema", **identity, "step": trainer.step, "sigma_rel": sigma_rel, "gamma": gamma},
            )

    if trainer.step >= loop.iters:  # finished, but the final snapshots were removed
        save_snapshots()
        return final
    pre: Prefetcher | None = None
    if use_prefetch(prefetch, loss_fn, loop, device, loop.iters - trainer.step):
        n = torch.get_num_threads()
        log.info("%s: batches computed in a second process (%d thread%s), ahead of the optimiser", desc, n, "s"[: n - 1])
        split = cast(SplitLoss, loss_fn)
        pre = Prefetcher(split, seed=loop.seed, batch=loop.batch, start=trainer.step, stop=loop.iters, threads=n)
    with (
        pre or contextlib.nullcontext(),
        tqdm(total=loop.iters, initial=trainer.step, desc=desc, disable=not progress, dynamic_ncols=True) as bar,
    ):
        while trainer.step < loop.iters:
            loss = trainer.train_step(pre.get(trainer.step)) if pre else trainer.train_step()
            last = trainer.step == loop.iters
            if last or trainer.step % loop.snapshot_every == 0:
                save_snapshots()
            if last or trainer.step % checkpoint_every == 0:
                save_state()
            bar.update(1)
            if trainer.step % 16 == 0 or last:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if on_step is not None:
                on_step(trainer.step, loss)
    return final
