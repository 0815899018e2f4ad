"""The image recipe: an EDM-preconditioned denoiser trained on an image data set (the built-in
digits or a folder) with the EDM loss (Karras et al. 2022, eq. 2 and Table 1).

Per step: ``ln sigma ~ N(P_mean, P_std^2)``, ``x = x0 + sigma n``, a label replaced by the null label
with probability ``label_dropout`` (so one network is both conditional and unconditional, for CFG),
loss ``lambda(sigma) |D(x; sigma, y) - x0|^2`` (``recipe="gft"``: guidance-free training, :mod:`.gft`,
a network with the extra scalar ``beta``). Adam with EDM2's inverse-sqrt learning rate, two
power-function EMA profiles whose periodic snapshots allow post-hoc EMA (:mod:`.phema`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .._io import atomic_write
from ..denoisers import edm_loss
from ..errors import check
from .loop import LoopConfig, LossFn, train

if TYPE_CHECKING:
    from ..data import ImageData

#: ``draw(batch, generator) -> (x0 [batch, C, H, W], labels [batch] or None)``.
Draw = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]

MODELS = ("PixelMLP", "UNet", "EDM2")
RECIPES = ("images", "gft")


#: The widest network a config may ask for (hidden, emb): beyond it a typo allocates terabytes.
MAX_WIDTH = 65536


@dataclass(frozen=True)
class ImageConfig:
    """Everything that determines an image model. Defaults: the digits model of docs/RESULTS.md."""

    data: str = "digits"  # "digits" (train split) or an image folder
    resolution: int | None = None  # folder images resized to this (None: keep; digits are 8x8)
    channels: int = 1  # folder images: 1 (grey) or 3 (RGB)
    model: str = "PixelMLP"
    hidden: int = 512
    depth: int = 4
    emb: int = 128
    sigma_data: float = 0.5
    conditional: bool = True  # class-conditional (needs labels) with a null label
    noise_cond: bool = True  # False: a noise-unconditional network
    label_dropout: float = 0.1
    P_mean: float = -1.2
    P_std: float = 1.2
    batch: int = 256
    iters: int = 16384
    lr: float = 2e-3
    lr_ref_steps: int = 2048
    betas: tuple[float, float] = (0.9, 0.99)
    ema: tuple[float, ...] = (0.05, 0.10)  # two profiles, as EDM2 keeps for post-hoc EMA
    snapshot_every: int = 1024
    seed: int = 0
    recipe: str = "images"  # "images": the EDM loss; "gft": guidance-free training (.gft)
    init: str = ""  # a checkpoint (.safetensors) the network starts from ("": a fresh init); perceptual's frozen copy
    perceptual: float = 0.0  # weight of the self-perceptual loss (.perceptual; 0: off, 1: the paper's); needs init
    perceptual_layer: str = ""  # module whose input is the feature map ("": .perceptual.default_layer)
    mg_w: float = 1.0  # model-guidance training (.model_guidance) at this CFG weight (1: off); needs conditional

    def __post_init__(self) -> None:
        for f in fields(self):  # each key of the type of its default
            v, d = getattr(self, f.name), f.default
            if isinstance(d, bool):
                ok = isinstance(v, bool)
            elif isinstance(d, (int, float)):
                ok = (
                    isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                    and (isinstance(v, int) or isinstance(d, float))
                )
            elif isinstance(d, tuple):
                ok = (
                    isinstance(v, tuple)
                    and bool(v)
                    and all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in v)
                )
            else:
                ok = isinstance(v, type(d)) or (d is None and (v is None or isinstance(v, int) and not isinstance(v, bool)))
            check(ok, f"image config key {f.name} must be like {d!r} ({type(d).__name__}), got {v!r}")
        for k in ("hidden", "depth", "emb", "batch", "iters", "snapshot_every", "lr_ref_steps"):
            check(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
        check(
            self.hidden <= MAX_WIDTH and self.emb <= MAX_WIDTH and self.depth <= 256,
            f"hidden / emb above the limit {MAX_WIDTH} (or depth above 256): {self.hidden}, {self.emb}, {self.depth}",
        )
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(all(0 < e < 0.2887 for e in self.ema), f"ema sigma_rel values must be in (0, 0.2887), got {self.ema}")
        check(self.recipe in RECIPES, f"unknown recipe {self.recipe!r}; allowed: {list(RECIPES)}")
        check(self.recipe != "gft" or self.conditional, "recipe 'gft' needs conditional=true (it guides the class label)")
        check(self.model in MODELS, f"unknown model {self.model!r}; allowed: {list(MODELS)}")
        check(self.model != "EDM2" or self.recipe == "images", "model EDM2 trains with recipe 'images' (it has no extra scalar)")
        check(0 <= self.label_dropout <= 1, f"label_dropout must be in [0, 1], got {self.label_dropout!r}")
        check(0 <= self.perceptual <= 1, f"perceptual must be in [0, 1], got {self.perceptual!r}")
        check(self.perceptual == 0 or bool(self.init), "perceptual > 0 needs init=CHECKPOINT (the frozen perceptual network)")
        check(self.mg_w >= 1, f"mg_w must be >= 1 (1: no model guidance), got {self.mg_w!r}")
        check(
            self.mg_w == 1 or (self.conditional and self.label_dropout > 0),
            "mg_w > 1 needs conditional=true and label_dropout > 0",
        )
        check(self.mg_w == 1 or self.recipe == "images", "mg_w > 1 trains with recipe 'images'")
        check(self.perceptual == 0 or self.mg_w == 1, "perceptual and mg_w cannot be combined")
        check(self.P_std > 0, f"P_std must be > 0, got {self.P_std!r}")
        self.loop()

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        """Build from a dict (a config file, a checkpoint's ``meta``); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        check(not unknown, f"unknown image config keys {unknown}; allowed: {sorted(names)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)

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
        d = asdict(self)
        d["extra_scalar"] = None  # a removed field, kept in the hash: run folder names stay as in docs/RESULTS.md
        if d["recipe"] == "images":
            del d["recipe"]  # runs from before the recipe field keep their names
        for k, default in (("init", ""), ("perceptual", 0.0), ("perceptual_layer", ""), ("mg_w", 1.0)):
            if d[k] == default:
                del d[k]  # keys added later: runs without them keep their names
        digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
        src = "digits" if self.data == "digits" else Path(self.data).name
        src = src if self.recipe == "images" else f"{self.recipe}-{src}"
        return f"{src}-{self.model}-h{self.hidden}-i{self.iters}-{digest}"


def load_data(cfg: ImageConfig) -> ImageData:
    """The training images of ``cfg`` (:class:`guidelab.data.ImageData`)."""
    from ..data import digits, image_folder

    if cfg.data == "digits":
        return digits("train")
    return image_folder(cfg.data, cfg.resolution, cfg.channels)


def model_config(cfg: ImageConfig, data: ImageData) -> dict[str, Any]:
    if cfg.conditional:
        check(data.labels is not None, f"conditional=true needs class sub-folders in {cfg.data}; or set conditional=false")
    _, c, h, w = data.images.shape
    check(h == w, f"images must be square, got {h}x{w}; pass a resolution")
    if cfg.model == "EDM2":  # models.edm2: hidden = model_channels, depth = num_blocks, emb = logvar_channels
        return {
            "name": "EDM2",
            "img_channels": c,
            "img_resolution": h,
            "label_dim": data.num_classes if cfg.conditional else 0,
            "use_fp16": False,
            "sigma_data": cfg.sigma_data,
            "logvar_channels": cfg.emb,
            "model_channels": cfg.hidden,
            "channel_mult": [1, 2],
            "num_blocks": cfg.depth,
            "attn_resolutions": [h // 2],
            "channels_per_head": min(64, cfg.hidden),
            "noise_cond": cfg.noise_cond,
        }
    return {
        "name": cfg.model,
        "img_channels": c,
        "img_resolution": h,
        "hidden": cfg.hidden,
        "depth": cfg.depth,
        "emb": cfg.emb,
        "sigma_data": cfg.sigma_data,
        "num_classes": data.num_classes if cfg.conditional else 0,
        "noise_cond": cfg.noise_cond,
        "extra_scalar": "beta" if cfg.recipe == "gft" else None,
    }


def image_draw(data: ImageData) -> Draw:
    """``draw(batch, generator) -> (x0, labels or None)``: random training images of ``data``, drawn on the
    generator's device (all randomness from the step's generator; the data set moved there once)."""
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def draw(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = gen.device
        if dev not in on_device:
            on_device[dev] = (data.images.to(dev), None if data.labels is None else data.labels.to(dev))
        x0_all, labels_all = on_device[dev]
        i = torch.randint(len(x0_all), (batch,), generator=gen, device=dev)
        return x0_all[i], None if labels_all is None else labels_all[i]

    return draw


def image_loss(cfg: ImageConfig, data: ImageData) -> LossFn:
    """``loss_fn(net, batch, generator) -> [batch]``: the EDM loss on random training images."""
    draw = image_draw(data)
    frozen: dict[str | torch.device, torch.nn.Module] = {}
    if cfg.perceptual:
        from .checkpoint import load_model

        frozen["cpu"] = load_model(cfg.init).eval().requires_grad_(False)

    # net: the registry's PixelMLP / UNet / EDM2 of model_config; its attributes (num_classes, null_label,
    # precond, logvar) are read as the network declares them, hence Any.
    def loss_fn(net: Any, batch: int, gen: torch.Generator) -> torch.Tensor:
        dev = gen.device
        x0, labels = draw(batch, gen)
        sigma = (torch.randn(batch, generator=gen, device=dev) * cfg.P_std + cfg.P_mean).exp()  # EDM: ln sigma ~ N
        n = torch.randn(x0.shape, generator=gen, device=dev)
        cond: dict[str, torch.Tensor] = {}
        key = getattr(getattr(net, "condition", None), "key", "label")  # EDM2: class_labels
        if net.num_classes:
            drop = torch.rand(batch, generator=gen, device=dev) < cfg.label_dropout
            assert labels is not None  # a conditional network's data is labelled (model_config checks it)
            cond[key] = torch.where(drop, net.null_label, labels)
        if cfg.recipe == "gft":
            from .gft import draw_beta, gft_loss

            return gft_loss(
                net,
                x0 + sigma[:, None, None, None] * n,
                sigma,
                x0,
                net.precond,
                beta=draw_beta(batch, gen, dev),
                label=cond["label"],
                null_label=net.null_label,
            )
        x = x0 + sigma[:, None, None, None] * n
        if cfg.perceptual:
            from .perceptual import self_perceptual_loss

            if dev not in frozen:
                frozen[dev] = frozen["cpu"].to(dev)
            loss = self_perceptual_loss(
                net, frozen[dev], x, sigma, x0, net.precond, weight=cfg.perceptual, gen=gen,
                P_mean=cfg.P_mean, P_std=cfg.P_std, layer=cfg.perceptual_layer or None, **cond,
            )  # fmt: skip
        elif cfg.mg_w != 1:
            from .model_guidance import mg_loss

            loss = mg_loss(net, x, sigma, x0, net.precond, label=cond[key], null_label=net.null_label, w=cfg.mg_w, key=key)
        else:
            loss = edm_loss(net, x, sigma, x0, net.precond, **cond)
        if hasattr(net, "logvar"):  # EDM2's learned uncertainty u(sigma): loss / e^u + u (EDM2 eq. 21)
            u = net.logvar(sigma)
            loss = loss / u.exp() + u
        return loss

    return loss_fn


def plot_loss(losses: Sequence[float], path: str | Path) -> Path:
    """Loss curve (raw and smoothed, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    y = np.asarray(losses, dtype=np.float64)
    k = max(1, len(y) // 100)
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.35, label="loss")
    ax.plot(np.arange(k, len(y) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="EDM loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))  # a kill never leaves a partial PNG
    plt.close(fig)
    return path


# model: a loaded PixelMLP / UNet / EDM2; its num_classes, img_* and condition are read as it declares them, hence Any.
@torch.no_grad()
def sample_grid(
    model: Any, path: str | Path, *, per_class: int = 10, steps: int = 32, seed: int = 0, sigma_max: float = 80.0, w: float = 1.0
) -> Path:
    """A PNG grid of samples (EDM Heun, ``karras(steps, 0.002, sigma_max)``): one row per class
    (``per_class`` seeds each) or, unconditional, a square of ``per_class^2``. Seeds ``seed, seed+1, ...``.
    A GFT network (extra scalar ``beta``) is sampled at ``beta = 1 / w``. Written atomically."""
    from .._io import class_grid, write_png
    from ..rng import SampleNoise
    from ..samplers import heun
    from ..schedules import karras

    rows = model.num_classes or per_class
    n = rows * per_class
    noise = SampleNoise(list(range(seed, seed + n)))
    shape = (n, model.img_channels, model.img_resolution, model.img_resolution)
    sigmas = karras(steps, 0.002, sigma_max).float()
    dev = next(model.parameters()).device
    x = (noise.randn(shape[1:]) * sigmas[0]).to(dev)
    key = getattr(getattr(model, "condition", None), "key", "label")
    cond = {key: (torch.arange(n) // per_class).to(dev)} if model.num_classes else None
    den = model
    if getattr(model, "extra_scalar", None) == "beta":
        from .gft import gft_denoiser

        den = gft_denoiser(model, w)
    x = heun(den, x, sigmas, cond=cond)
    labels = None if cond is None else cond[key].cpu()
    scale = max(1, 512 // (per_class * model.img_resolution))
    return write_png(path, class_grid(x.cpu(), labels, range(n), per_row=per_class, scale=scale))


def train_images(
    out_dir: str | Path = "runs/images",
    cfg: ImageConfig | None = None,
    *,
    progress: bool = True,
    checkpoint_every: int = 256,
    threads: int | None = None,
    plot: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Train (or resume, or reuse) the image run ``out_dir/<cfg.name()>``; return its final EMA snapshot.

    At the end ``loss.png`` (the loss curve) is written next to the checkpoints. Load the result
    with :func:`guidelab.training.load_model`; post-hoc EMA with :func:`guidelab.training.phema.reconstruct`.
    ``device``: where the network, the data and the step generators live (bit-identical resume is
    tested on the CPU).
    """
    cfg = cfg or ImageConfig()
    data = load_data(cfg)
    run_dir = Path(out_dir) / cfg.name()
    init = None
    if cfg.init:
        from ..models import registry as model_registry
        from .checkpoint import load_model

        start = load_model(cfg.init)
        fresh = model_registry.build(model_config(cfg, data)).state_dict()
        init = start.state_dict()
        check(
            fresh.keys() == init.keys() and all(fresh[k].shape == init[k].shape for k in fresh),
            f"init {cfg.init} ({model_registry.config(start)}) does not fit this run's network {model_config(cfg, data)}",
        )
    final = train(
        run_dir,
        model_config(cfg, data),
        image_loss(cfg, data),
        cfg.loop(),
        meta=asdict(cfg),
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=cfg.name(),
        device=device,
        threads=threads,
        on_step=on_step,
        init=init,
    )
    if plot:
        from .checkpoint import load

        plot_loss(load(run_dir / "state.safetensors")[0]["log/loss"].tolist(), run_dir / "loss.png")
    return final
