"""NVlabs' published EDM2 sampling presets as data, resolved against a local folder of checkpoint files.

Sources: ``config_presets`` of NVlabs/edm2 ``generate_images.py`` (plain EDM2, CFG with the XS
unconditional network, autoguidance; the metric each reaches is in its comment there) and the
guidance-interval paper's code (kynkaat/guidance-interval, ``generate_zip.py``: EDM2-XXL with the XS
unconditional guide, steps [17, 22] at w = 2.0 for FID, [13, 19] at w = 2.9 for FD_DINOv2). Every preset
samples with EDM's Heun sampler, 32 steps, sigma in [0.002, 80], rho = 7 (:data:`SAMPLER`).

A file name ``edm2-img512-xxl-0939524-0.075`` reads: resolution, size, training length (kimg, i.e.
thousands of images) and the post-hoc EMA length ``sigma_rel``. The guidance weight is EDM2's
``guidance`` = our ``w`` (``D = D_guide + w (D_main - D_guide)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..denoisers import Denoiser
from ..errors import GuidelabError, check

#: Where NVlabs publishes the networks (for the error message; nothing is ever downloaded).
URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"

#: EDM's Heun sampler settings every preset uses (edm2 ``generate_images.py::edm_sampler``).
SAMPLER: dict[str, Any] = dict(sampler="heun", steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)


@dataclass(frozen=True)
class Preset:
    """One published configuration. ``guider``: ``"none"``, ``"cfg"`` (``gnet`` is an unconditional
    network) or ``"autoguidance"``; ``interval_steps``: guidance only at those Heun steps (inclusive)."""

    name: str
    net: str
    gnet: str | None = None
    w: float = 1.0
    guider: str = "none"
    metric: str = "fid"
    value: float | None = None
    interval_steps: tuple[int, int] | None = None
    note: str = ""

    @property
    def files(self) -> list[str]:
        return [self.net] + ([self.gnet] if self.gnet else [])

    @property
    def latent(self) -> bool:
        """ImageNet-512 networks run on SD-VAE latents (:mod:`guidelab.models.edm2_latents`)."""
        return self.net.startswith("edm2-img512")

    @property
    def sigma_interval(self) -> tuple[float, float] | None:
        """``(sigma_lo, sigma_hi)`` for ``guidance.interval``: ``(sigma_{stop+1}, sigma_start]`` of the 32-step
        schedule. A sigma gate cannot tell apart two evaluations at the same sigma, so two of the official
        code's evaluations differ: the second one of step ``start - 1`` (guided here) and of step ``stop``
        (not guided here)."""
        if self.interval_steps is None:
            return None
        from ..schedules import karras

        s = karras(SAMPLER["steps"], SAMPLER["sigma_min"], SAMPLER["sigma_max"], SAMPLER["rho"]).tolist()
        start, stop = self.interval_steps
        return s[stop + 1], s[start]


def ema(stem: str) -> float:
    """The post-hoc EMA length ``sigma_rel`` in a file name (``edm2-img64-s-1073741-0.075`` -> 0.075)."""
    return float(stem.rsplit("-", 1)[1])


def _table() -> dict[str, Preset]:
    p = "edm2-img512-"
    plain = [
        ("xs", "2147483-0.135", 3.53, "2147483-0.200", 103.39),
        ("s", "2147483-0.130", 2.56, "2147483-0.190", 68.64),
        ("m", "2147483-0.100", 2.25, "2147483-0.155", 58.44),
        ("l", "1879048-0.085", 2.06, "1879048-0.155", 52.25),
        ("xl", "1342177-0.085", 1.96, "1342177-0.155", 45.96),
        ("xxl", "0939524-0.070", 1.91, "0939524-0.150", 42.84),
    ]
    out = []
    for size, fid_file, fid, dino_file, dino in plain:
        out += [
            Preset(f"{p}{size}-fid", f"{p}{size}-{fid_file}", value=fid),
            Preset(f"{p}{size}-dino", f"{p}{size}-{dino_file}", metric="fd_dinov2", value=dino),
        ]
    out += [
        Preset(f"edm2-img64-{size}-fid", f"edm2-img64-{size}-{f}", value=v)
        for size, f, v in (
            ("s", "1073741-0.075", 1.58),
            ("m", "2147483-0.060", 1.43),
            ("l", "1073741-0.040", 1.33),
            ("xl", "0671088-0.040", 1.33),
        )
    ]
    guid = [
        ("xs", "2147483", "0.045", 1.40, 2.91, "0.150", 1.70, 79.94),
        ("s", "2147483", "0.025", 1.40, 2.23, "0.085", 1.90, 52.32),
        ("m", "2147483", "0.030", 1.20, 2.01, "0.015", 2.00, 41.98),
        ("l", "1879048", "0.015", 1.20, 1.88, "0.035", 1.70, 38.20),
        ("xl", "1342177", "0.020", 1.20, 1.85, "0.030", 1.70, 35.67),
        ("xxl", "0939524", "0.015", 1.20, 1.81, "0.015", 1.70, 33.09),
    ]
    for size, kimg, e_fid, w_fid, fid, e_dino, w_dino, dino in guid:
        out += [
            Preset(f"{p}{size}-guid-fid", f"{p}{size}-{kimg}-{e_fid}", f"{p}xs-uncond-2147483-{e_fid}", w_fid, "cfg", value=fid),
            Preset(
                f"{p}{size}-guid-dino",
                f"{p}{size}-{kimg}-{e_dino}",
                f"{p}xs-uncond-2147483-{e_dino}",
                w_dino,
                "cfg",
                "fd_dinov2",
                dino,
            ),
        ]
    autog = [
        ("edm2-img512-s-autog-fid", "edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125", 2.10, "fid", 1.34),
        ("edm2-img512-s-autog-dino", "edm2-img512-s-2147483-0.120", "edm2-img512-xs-0134217-0.165", 2.45, "fd_dinov2", 36.67),
        ("edm2-img512-xxl-autog-fid", "edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", 2.05, "fid", 1.25),
        ("edm2-img512-xxl-autog-dino", "edm2-img512-xxl-0939524-0.130", "edm2-img512-m-0268435-0.205", 2.30, "fd_dinov2", 24.18),
        (
            "edm2-img512-s-uncond-autog-fid",
            "edm2-img512-s-uncond-2147483-0.070",
            "edm2-img512-xs-uncond-0134217-0.110",
            2.85,
            "fid",
            3.86,
        ),
        (
            "edm2-img512-s-uncond-autog-dino",
            "edm2-img512-s-uncond-2147483-0.090",
            "edm2-img512-xs-uncond-0134217-0.125",
            2.90,
            "fd_dinov2",
            90.39,
        ),
        ("edm2-img64-s-autog-fid", "edm2-img64-s-1073741-0.045", "edm2-img64-xs-0134217-0.110", 1.70, "fid", 1.01),
        ("edm2-img64-s-autog-dino", "edm2-img64-s-1073741-0.105", "edm2-img64-xs-0134217-0.175", 2.20, "fd_dinov2", 31.85),
    ]
    out += [Preset(n, net, gnet, w, "autoguidance", m, v) for n, net, gnet, w, m, v in autog]
    files = (
        "the interval paper shares its networks without naming the files; these are EDM2's "
        "CFG-preset files (an assumption: rename yours to match)"
    )
    out += [
        Preset(
            "edm2-img512-xxl-interval-fid",
            f"{p}xxl-0939524-0.015",
            f"{p}xs-uncond-2147483-0.015",
            2.0,
            "cfg",
            "fid",
            1.40,
            (17, 22),
            files,
        ),
        Preset(
            "edm2-img512-xxl-interval-dino",
            f"{p}xxl-0939524-0.015",
            f"{p}xs-uncond-2147483-0.015",
            2.9,
            "cfg",
            "fd_dinov2",
            None,
            (13, 19),
            files,
        ),
    ]
    return {q.name: q for q in out}


#: Preset name -> :class:`Preset`.
PRESETS: dict[str, Preset] = _table()


def get(name: str) -> Preset:
    check(name in PRESETS, f"unknown EDM2 preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def find(models_dir: str | os.PathLike, stem: str, preset: str = "") -> Path:
    """``models_dir/<stem>.safetensors`` (converted) or ``<stem>.pkl``; a missing file is one clear error."""
    d = Path(models_dir)
    check(d.is_dir(), f"--models {d} is not a folder")
    for ext in (".safetensors", ".pkl"):
        if (d / (stem + ext)).is_file():
            return d / (stem + ext)
    raise GuidelabError(
        f"{'preset ' + preset + ' needs ' if preset else 'missing '}{stem}.pkl (or {stem}.safetensors, "
        f"guidelab convert-edm2) in {d}; NVlabs publishes it at {URL}/{stem}.pkl"
    )


@dataclass(frozen=True)
class Resolved:
    """A preset with its local files: ``net`` and ``gnet`` paths (``gnet`` None without a guide); load each
    with ``guidelab.training.phema.load_network`` (``.pkl`` or ``.safetensors``)."""

    preset: Preset
    net: Path
    gnet: Path | None


def resolve(name: str, models_dir: str | os.PathLike) -> Resolved:
    """Find the preset's files in ``models_dir``; raises a GuidelabError naming the first missing file."""
    p = get(name)
    return Resolved(p, find(models_dir, p.net, name), find(models_dir, p.gnet, name) if p.gnet else None)


def guided(preset: Preset | str, net: Denoiser, gnet: Denoiser | None = None, w: float | None = None) -> Denoiser:
    """The preset's guided denoiser on loaded networks (``w`` overrides its weight). Any other guider
    takes the same pair: ``guidance.apg(guidance.cfg(net, w, uncond=gnet))``, ``guidance.interval(...)``, ..."""
    from .. import guidance

    p = get(preset) if isinstance(preset, str) else preset
    w = p.w if w is None else w
    if p.guider == "none":
        return net
    if gnet is None:
        raise GuidelabError(f"preset {p.name} guides with {p.gnet}: pass gnet")
    g = guidance.autoguidance(net, gnet, w) if p.guider == "autoguidance" else guidance.cfg(net, w, uncond=gnet)
    interval = p.sigma_interval
    return g if interval is None else guidance.interval(g, *interval)
