"""Guidance distillation (Meng et al. 2023, arXiv 2210.03142; methods.md §9), for ANY guider.

A student ``D_s(x; sigma, c, w)`` with the guidance weight as an extra scalar input regresses the guided
teacher over a range of weights::

    L = lambda(sigma) * mean || D_s(x; sigma, c, w) - sg[D_teacher^w(x; sigma, c)] ||^2,
    w ~ U[w_min, w_max] per sample,  x = x0 + sigma n,  ln(sigma) ~ N(P_mean, P_std^2)

with EDM's ``lambda(sigma) = 1 / c_out^2`` (the same data, noise and weighting as diffusion training).
The teacher is ``guider(w)``, any function from a [batch] weight tensor to a denoiser, e.g.
``lambda w: guidance.cfg(net, w)`` or ``lambda w: guidance.autoguidance(main, guide, w)`` (distilled
autoguidance). Sampling the student costs ONE network evaluation per step (:func:`distilled_denoiser`).

Convention: guidelab's ``w`` (``w = 1``: no guidance, ``D = D_ref + w (D - D_ref)``) is Meng's
``w_Meng + 1`` (Meng: ``x^w = (1 + w) x_c - w x_u``); Meng's pixel range ``w_Meng in [0, 4]`` is
``w in [1, 5]`` here. The student sees guidelab's ``w``.

Stage 2 (:func:`progressive_loss`, :func:`progressive_round`): progressive distillation (Salimans &
Ho 2022) of the w-conditioned student: a new student, initialised from the teacher's weights, takes
ONE deterministic Euler (DDIM) step from sigma_i to sigma_{i+2} where the teacher takes two, keeping
w as an input; each round halves the step count. Deterministic sampler only.

Image models (``guidelab distill``): :func:`distill_images` (stage 1 of a checkpoint or run folder, the
student initialised from the teacher) and :func:`progressive_images` (rounds in ``OUT/steps-<K>``). Every
student checkpoint carries ``meta["distilled"]`` (:func:`distilled_info`): the ``w`` keyword, the weight
range and, after stage 2, the sampler and the exact sigma grid it must be sampled on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch

from ..denoisers import Denoiser, bcast, edm_loss
from ..errors import GuidelabError, check
from ..guidance import registry as guiders
from ..models import registry
from . import checkpoint
from .loop import LoopConfig, LossFn, train
from .phema import load_network
from .student import distilled_denoiser, distilled_info  # noqa: F401  (sampling side of a student)

#: ``guider(w) -> denoiser``, ``w`` a [batch] tensor (or a number).
Guider = Callable[[Any], Callable[..., torch.Tensor]]
#: ``data(batch, generator) -> x0`` or ``(x0, cond)``: clean data and its conditioning (e.g. ``{"label": y}``).
Data = Callable[[int, torch.Generator], Any]


@dataclass(frozen=True)
class DistillConfig:
    """The distillation loss settings (the optimisation settings are a :class:`LoopConfig`)."""

    w_min: float = 1.0
    w_max: float = 5.0  # Meng's pixel range w_Meng in [0, 4]
    P_mean: float = -1.2  # ln(sigma) ~ N(P_mean, P_std^2), EDM's defaults
    P_std: float = 1.2
    key: str = "w"  # the student's extra scalar keyword

    def __post_init__(self) -> None:
        check(self.w_min <= self.w_max, f"need w_min <= w_max, got [{self.w_min}, {self.w_max}]")
        check(self.P_std > 0, f"P_std must be > 0, got {self.P_std!r}")
        check(isinstance(self.key, str) and self.key.isidentifier(), f"key must be a keyword name, got {self.key!r}")


@dataclass(frozen=True)
class NetworkRef:
    """A checkpoint or a training run folder (its post-hoc EMA of ``sigma_rel`` at ``step``, default the last)."""

    path: str | Path
    sigma_rel: float = 0.10
    step: int | None = None

    def load(self, device: str = "cpu") -> torch.nn.Module:
        return load_network(self.path, sigma_rel=self.sigma_rel, step=self.step, device=device)


@dataclass(frozen=True)
class Runtime:
    """How a run executes, not what it learns: progress bar, training-state period, device, CPU threads."""

    progress: bool = True
    checkpoint_every: int = 256
    device: str = "cpu"
    threads: int | None = None


def _train(run_dir: str | Path, model_config: dict, loss_fn: LossFn, loop: LoopConfig, rt: Runtime, **kw: Any) -> Path:
    return train(
        run_dir,
        model_config,
        loss_fn,
        loop,
        checkpoint_every=rt.checkpoint_every,
        progress=rt.progress,
        device=rt.device,
        threads=rt.threads,
        **kw,
    )


def _split(out: Any) -> tuple[torch.Tensor, dict]:
    """``x0`` or ``(x0, cond)`` (what a :data:`Data` returns) -> ``(x0, cond)``."""
    if isinstance(out, torch.Tensor):
        return out, {}
    x0, cond = out
    return x0, dict(cond or {})


def distill_loss(guider: Guider, data: Data, cfg: DistillConfig = DistillConfig()) -> LossFn:
    """The stage-1 loss ``loss_fn(student, batch, generator) -> [batch]`` (all randomness from the generator).

    The student must have a ``precond`` (:class:`guidelab.denoisers.EDMPrecond`) for ``lambda(sigma)``.
    """

    # student: a registry network with a precond (read as the network declares it), hence Any
    def loss_fn(student: Any, batch: int, gen: torch.Generator) -> torch.Tensor:
        x0, cond = _split(data(batch, gen))
        dev = x0.device
        sigma = (torch.randn(batch, generator=gen, device=dev) * cfg.P_std + cfg.P_mean).exp().to(x0.dtype)
        x = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * torch.randn(x0.shape, generator=gen, device=dev, dtype=x0.dtype)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=gen, device=dev, dtype=x0.dtype)
        with torch.no_grad():  # sg[.]: the teacher is a fixed target
            target = guider(w)(x, sigma, **cond)
        return edm_loss(student, x, sigma, target.to(x0.dtype), student.precond, **cond, **{cfg.key: w})

    return loss_fn


def distill_student(
    run_dir: str | Path,
    model_config: dict,
    guider: Guider,
    data: Data,
    cfg: DistillConfig = DistillConfig(),
    loop: LoopConfig = LoopConfig(),  # noqa: B008  (frozen dataclass: an immutable default)
    *,
    teacher: str = "",
    runtime: Runtime = Runtime(),
) -> Path:
    """Distil ``guider`` into a fresh ``model_config`` network; return the final EMA snapshot's path.

    Resumable and reused like any :func:`guidelab.training.train` run. ``model_config`` must name a
    network with ``extra_scalar=cfg.key`` (e.g. ToyMLP / PixelMLP). The guider and data are code, not
    config: ``teacher`` (a free-form description, e.g. checkpoint paths and the guider's name) is stored
    in the run's metadata so a folder is not silently reused for another teacher.
    """
    check(
        model_config.get("extra_scalar") == cfg.key,
        f"the student needs extra_scalar={cfg.key!r} in its model config, got {model_config.get('extra_scalar')!r}",
    )
    meta = {"recipe": "distill", **asdict(cfg), "teacher": teacher}
    return _train(run_dir, model_config, distill_loss(guider, data, cfg), loop, runtime, meta=meta, desc="distill")


# ----------------------------------------------------------------------------------------------
# Stage 2: progressive distillation (Salimans & Ho 2022), w kept as an input.


def euler_step(D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic Euler / DDIM step of the PF-ODE, per-sample sigmas [batch] (as ``samplers.euler``):
    ``x + (sigma_next - sigma) (x - D) / sigma = D + (sigma_next / sigma) (x - D)``."""
    return torch.lerp(D, x, bcast(sigma_next / sigma, x))


def _check_grid(sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    n = s.numel() - 1
    check(
        s.ndim == 1 and n >= 2 and n % 2 == 0 and bool((s[1:] < s[:-1]).all()) and bool(s[-1] == 0),
        f"the teacher's sigmas must strictly decrease to 0 over an even number of steps, got {s.tolist()}",
    )
    return s


def progressive_loss(
    teacher: Callable[..., torch.Tensor],
    sigmas: torch.Tensor | Sequence[float],
    data: Data,
    cfg: DistillConfig = DistillConfig(),
) -> LossFn:
    """One round's loss ``loss_fn(student, batch, generator) -> [batch]``.

    ``teacher`` is a w-conditioned denoiser (the stage-1 student or a previous round) sampled with
    Euler on ``sigmas`` (2K steps, ending in 0); the student gets the grid ``sigmas[::2]`` (K steps).
    With ``x = x0 + sigma_i n`` at a student level ``sigma_i`` (uniform over the K levels) the teacher
    takes two steps to ``x''`` at ``sigma_{i+2}``; the student's target is the x0 prediction whose ONE
    Euler step lands on ``x''``: ``D~ = x - sigma_i (x'' - x) / (sigma_{i+2} - sigma_i)`` (= ``x''`` when
    ``sigma_{i+2} = 0``; Salimans & Ho Alg. 2 in EDM's sigma parameterisation). Weight: EDM's lambda
    (Salimans & Ho use truncated SNR weighting). ``cfg.P_mean`` / ``P_std`` are unused: sigma is on the grid.
    """
    grid = _check_grid(sigmas)

    def loss_fn(student: Any, batch: int, gen: torch.Generator) -> torch.Tensor:  # Any: as in distill_loss
        x0, cond = _split(data(batch, gen))
        dev, dt = x0.device, x0.dtype
        g = grid.to(dev, dt)
        i = 2 * torch.randint(0, (g.numel() - 1) // 2, (batch,), generator=gen, device=dev)
        s0, s1, s2 = g[i], g[i + 1], g[i + 2]
        x = x0 + bcast(s0, x0) * torch.randn(x0.shape, generator=gen, device=dev, dtype=dt)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=gen, device=dev, dtype=dt)
        with torch.no_grad():  # two teacher steps, a fixed target
            x1 = euler_step(teacher(x, s0, **cond, **{cfg.key: w}), x, s0, s1)
            x2 = euler_step(teacher(x1, s1, **cond, **{cfg.key: w}), x1, s1, s2)  # s1 > 0: only the last level is 0
            target = x - bcast(s0, x) * (x2 - x) / bcast(s2 - s0, x)
        return edm_loss(student, x, s0, target, student.precond, **cond, **{cfg.key: w})

    return loss_fn


def progressive_round(
    run_dir: str | Path,
    teacher_path: str | Path | torch.nn.Module,
    sigmas: torch.Tensor | Sequence[float],
    data: Data,
    cfg: DistillConfig = DistillConfig(),
    loop: LoopConfig = LoopConfig(),  # noqa: B008  (frozen dataclass: an immutable default)
    *,
    teacher: str = "",
    meta: dict | None = None,
    runtime: Runtime = Runtime(),
) -> Path:
    """One halving round: distil the teacher (a checkpoint path, or a loaded model; Euler on ``sigmas``,
    2K steps) into a student with the same config and the teacher's initial weights that samples on
    ``sigmas[::2]``.

    Resumable like :func:`distill_student`; returns the final EMA snapshot. Chain rounds by passing
    the returned path as the next ``teacher_path`` with ``sigmas[::2]``. Every checkpoint's
    ``meta["distilled"]`` records the student's grid (:func:`distilled_info`). ``teacher``: a description
    stored in the metadata (default: the path); ``meta``: more metadata.
    """
    grid = _check_grid(sigmas)
    net = checkpoint.load_model(teacher_path, runtime.device) if isinstance(teacher_path, (str, Path)) else teacher_path
    model_config = registry.config(net)
    check(
        model_config.get("extra_scalar") == cfg.key,
        f"the teacher needs extra_scalar={cfg.key!r}, got {model_config.get('extra_scalar')!r}",
    )
    meta = {
        "recipe": "progressive",
        "teacher": teacher or str(teacher_path),  # cfg.P_mean / P_std unused here
        "teacher_sigmas": grid.tolist(),
        "distilled": _info(cfg, grid[::2]),
        **(meta or {}),
    }
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return _train(
        run_dir,
        model_config,
        progressive_loss(net, grid, data, cfg),
        loop,
        runtime,
        meta=meta,
        desc=f"progressive {grid.numel() - 1}->{(grid.numel() - 1) // 2}",
        init=init,
    )


# ----------------------------------------------------------------------------------------------
# What a sampler needs to know about a student, and the image recipes behind `guidelab distill`.


def _info(cfg: DistillConfig, sigmas: torch.Tensor | Sequence[float] | None = None) -> dict:
    """``meta["distilled"]``: the scalar input, the weight range and (stage 2) the exact Euler grid."""
    return {
        "key": cfg.key,
        "w_min": cfg.w_min,
        "w_max": cfg.w_max,
        "sampler": None if sigmas is None else "euler",
        "sigmas": None if sigmas is None else [float(s) for s in sigmas],
    }


def describe(spec: str | Path, model: object) -> str:
    """A one-line identity of a loaded teacher (its path, and the post-hoc EMA it was rebuilt with)."""
    info = getattr(model, "checkpoint_info", {}) or {}
    if info.get("kind") == "phema":
        return f"{Path(spec)} (post-hoc EMA sigma_rel={info['sigma_rel']:g} at step {info['step']})"
    return str(Path(spec))


def init_from_teacher(teacher: torch.nn.Module, student_config: dict) -> dict[str, torch.Tensor]:
    """Student weights equal to the teacher's, with the new ``w`` input's weights zero: at
    initialisation the student is the unguided teacher for every ``w`` (Meng et al. start from the teacher).

    Supported: the image networks (the ``w`` Fourier features sit after the noise features in the
    embedding layer's input) and ToyMLP (``w`` is the last trunk input feature).
    """
    from ..models.image import ImageDenoiser
    from ..models.mlp import ToyMLP

    t_cfg = registry.config(teacher)
    check(t_cfg.get("extra_scalar") is None, f"the teacher already has an extra scalar input {t_cfg.get('extra_scalar')!r}")
    same = {k: v for k, v in student_config.items() if k != "extra_scalar"} == {
        k: v for k, v in t_cfg.items() if k != "extra_scalar"
    }
    check(same, "the student must have the teacher's config plus extra_scalar")
    with torch.random.fork_rng(devices=[]):
        student = registry.build(student_config)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    t_state = teacher.state_dict()
    at: int
    n: int
    if isinstance(teacher, ImageDenoiser):
        key, at = "emb_layer.weight", (teacher.emb if teacher.noise_cond else 0)
        n = cast(int, student.emb)
    elif isinstance(teacher, ToyMLP):
        key, at, n = "layers.0.weight", t_state["layers.0.weight"].shape[1], 1
    else:
        raise GuidelabError(
            f"init from the teacher supports the image networks and ToyMLP, not {type(teacher).__name__}; "
            "train the student from scratch"
        )
    new = sorted(k for k in state if k not in t_state and not k.startswith("extra_fourier."))
    check(
        not new, f"the student has layers the teacher lacks ({new[:3]}): a teacher without any conditioning; use init='scratch'"
    )
    for k, v in t_state.items():
        if k == key:
            w = torch.zeros_like(state[k])
            w[:, :at], w[:, at + n :] = v[:, :at], v[:, at:]
            state[k] = w
        else:
            check(state[k].shape == v.shape, f"teacher and student differ in {k}")
            state[k] = v.detach().clone()
    return state


def student_config(teacher: torch.nn.Module, key: str = "w") -> dict:
    """The teacher's model config plus the extra scalar input ``key``."""
    return {**registry.config(teacher), "extra_scalar": key}


def image_source(model: torch.nn.Module) -> dict:
    """``{"data", "resolution", "channels"}``: the training images behind an image teacher (its recipe config)
    or behind a student (copied into its metadata by :func:`distill_images`)."""
    meta = (getattr(model, "checkpoint_info", {}) or {}).get("meta") or {}
    src = meta.get("images") if meta.get("recipe") in ("distill", "progressive") else meta
    check(
        isinstance(src, dict) and "data" in src,
        "the teacher must be a checkpoint (or run) of the image recipe (guidelab train), whose config names its data",
    )
    assert isinstance(src, dict)  # checked above
    return {"data": src["data"], "resolution": src.get("resolution"), "channels": src.get("channels", 1)}


def image_data(source: dict, conditional: bool) -> Data:
    """``data(batch, generator) -> (x0, {"label": y})`` (no label when not ``conditional``): random training
    images of ``source`` (:func:`image_source`)."""
    from .images import ImageConfig, image_draw, load_data

    data = load_data(ImageConfig(**source))
    check(not conditional or data.labels is not None, f"{source['data']} has no labels for a class-conditional student")
    images = image_draw(data)

    def draw(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        x0, y = images(batch, gen)
        return x0, ({"label": y} if conditional else {})

    return draw


#: Guiders a student can distil: the registry's linear guiders of one network and a guide (deterministic).
GUIDERS = tuple(n for n in guiders.names(needs={"null_label", "guide"}) if guiders.get(n).linear)


def distill_images(
    run_dir: str | Path,
    teacher: NetworkRef,
    *,
    guider: str = "cfg",
    guide: NetworkRef | None = None,
    cfg: DistillConfig = DistillConfig(),
    loop: LoopConfig | None = None,
    init: str = "teacher",
    runtime: Runtime = Runtime(),
) -> Path:
    """Stage 1 on an image model (``guidelab distill``): a w-conditioned student of ``guider`` (one of
    :data:`GUIDERS`, built by the guider registry) applied to ``teacher``; ``guide``: autoguidance's weaker
    model, or cfg's unconditional one. ``init``: ``"teacher"`` (:func:`init_from_teacher`) or ``"scratch"``.
    Returns the final EMA snapshot."""
    check(guider in GUIDERS, f"unknown guider {guider!r}; allowed: {list(GUIDERS)}")
    check(init in ("teacher", "scratch"), f"init must be 'teacher' or 'scratch', got {init!r}")
    net = teacher.load(runtime.device)
    desc = f"{guider} of {describe(teacher.path, net)}"
    g = None
    if guide is not None:
        g = guide.load(runtime.device)
        desc += f" guided by {describe(guide.path, g)}"
    ctx = guiders.Context(net, guide=g, what=str(teacher.path))
    problems = guiders.unmet(guider, ctx)
    check(not problems, "; ".join(problems))

    def make(w: float | torch.Tensor) -> Denoiser:
        return guiders.build(guider, replace(ctx, w=w))

    model_config = student_config(net, cfg.key)
    weights = init_from_teacher(net, model_config) if init == "teacher" else None
    source = image_source(net)
    meta = {"recipe": "distill", **asdict(cfg), "teacher": desc, "init": init, "images": source, "distilled": _info(cfg)}
    data = image_data(source, bool(getattr(net, "num_classes", 0)))
    return _train(
        run_dir,
        model_config,
        distill_loss(make, data, cfg),
        loop or LoopConfig(),
        runtime,
        meta=meta,
        desc="distill",
        init=weights,
    )


def progressive_images(
    out_dir: str | Path,
    student: NetworkRef,
    *,
    to_steps: int,
    from_steps: int | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    loop: LoopConfig | None = None,
    runtime: Runtime = Runtime(),
) -> list[Path]:
    """Stage 2 on an image student (``guidelab distill --progressive``): halving rounds from ``from_steps``
    to ``to_steps`` Euler steps, round ``k`` in ``out_dir/steps-<K>``; returns each round's final snapshot.

    A stage-1 student starts on ``karras(from_steps, sigma_min, sigma_max, rho)``; a progressive student
    continues from the grid it was distilled on (``from_steps`` must then match it or be None). The
    weight range and the data come from the student's checkpoint.
    """
    from ..schedules import karras

    net = student.load(runtime.device)
    info = distilled_info(net)
    check(info is not None, f"{student.path} is not a distilled student (guidelab distill)")
    assert info is not None  # checked above
    if info["sigmas"] is not None:
        grid = torch.tensor(info["sigmas"], dtype=torch.float64)
        check(
            from_steps in (None, grid.numel() - 1),
            f"{student.path} samples on {grid.numel() - 1} steps; --from-steps must be that or left out, got {from_steps}",
        )
    else:
        check(from_steps is not None, "a stage-1 student needs --from-steps (its teacher grid: karras(from_steps, ...))")
        assert from_steps is not None  # checked above
        grid = karras(from_steps, sigma_min, sigma_max, rho=rho).double()
    n = grid.numel() - 1
    check(
        isinstance(to_steps, int) and 1 <= to_steps < n and n % to_steps == 0 and (n // to_steps) & (n // to_steps - 1) == 0,
        f"--to-steps must be {n} halved one or more times (e.g. {n // 2}), got {to_steps}",
    )
    cfg, loop = DistillConfig(w_min=info["w_min"], w_max=info["w_max"], key=info["key"]), loop or LoopConfig()
    source = image_source(net)
    data = image_data(source, bool(getattr(net, "num_classes", 0)))
    teacher, desc, paths = net, describe(student.path, net), []
    while n > to_steps:
        path = progressive_round(
            Path(out_dir) / f"steps-{n // 2}",
            teacher,
            grid,
            data,
            cfg,
            loop,
            teacher=desc,
            meta={"images": source},
            runtime=runtime,
        )
        paths.append(path)
        teacher, desc, grid, n = checkpoint.load_model(path, runtime.device), str(path), grid[::2], n // 2
    return paths
