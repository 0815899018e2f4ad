"""EDM2 on the command line: ``guidelab convert-edm2`` and ``guidelab sample --preset NAME --models DIR
[--vae DIR]`` (NVlabs' published presets from local files; :mod:`guidelab.models.edm2_presets`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import check
from ..models import edm2
from ..training.checkpoint import save_model

#: Preset guider -> guidelab guider registry name.
GUIDER = {"none": "none", "cfg": "cfg", "autoguidance": "autoguidance"}


def convert(pkl: str | os.PathLike, out: str | os.PathLike, key: str = "ema") -> Path:
    """NVlabs ``.pkl`` -> guidelab ``.safetensors`` (the pickle's source, kwargs and encoder kept in the config)."""
    net = edm2.load_pkl(pkl, key)
    return save_model(out, net, **net.checkpoint_info)


def preset_settings(name: str, models: str | os.PathLike | None, given: dict, explicit: set[str]) -> dict:
    """The sample settings a preset sets: ``model``, ``guide``, ``guider``, ``w``, ``interval``, ``label``.

    ``given``: the command's values; ``explicit``: the options set on the command line, which win over the
    preset (another ``--guider`` drops the preset's weight and interval unless given too)."""
    check(given.get("model") is None, "--preset names its own networks: drop --model")
    check(models is not None, "--preset needs --models DIR, the folder holding the preset's checkpoint files")
    r = edm2.resolve(name, models)
    p, out = r.preset, {}
    out["model"] = str(r.net)
    out["guide"] = given.get("guide") if "guide" in explicit else (str(r.gnet) if r.gnet else None)
    own = "guider" not in explicit or given.get("guider") == GUIDER[p.guider]
    out["guider"] = GUIDER[p.guider] if own else given.get("guider")
    out["w"] = p.w if own and "w" not in explicit else given.get("w")
    out["interval"] = given.get("interval") if "interval" in explicit else (p.sigma_interval if own else None)
    conditional = "uncond" not in p.net
    out["label"] = given.get("label") if "label" in explicit or not conditional else "balanced"
    return out


def decode_pngs(out: str | os.PathLike, vae: str | os.PathLike, device: str | None = None, batch: int = 8) -> int:
    """Decode the latent samples of a ``guidelab sample`` folder through the local VAE into ``out/png/<seed>.png``
    (EDM2's standardisation; default device cuda if available); returns the number of images."""
    from .jobs import load_samples, png_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    samples, seeds = load_samples(out)
    check(
        samples.ndim == 4 and samples.shape[1] == 4, f"--vae decodes 4-channel latents, the samples are {list(samples.shape[1:])}"
    )
    import json

    from . import provenance

    codec = edm2.VAELatents(edm2.load_vae(vae, device), batch_size=batch)
    try:  # the sampling job's provenance, and the VAE
        prov = json.loads((Path(out) / "job.json").read_text()).get("provenance") or {}
    except (OSError, ValueError):
        prov = {}
    prov = {**prov, **provenance.files(vae=vae)} if prov else provenance.collect(device=device, **provenance.files(vae=vae))
    for i in range(0, len(seeds), batch):
        images = codec.decode(torch.from_numpy(samples[i : i + batch]).to(device)).cpu().numpy()
        for seed, im in zip(seeds[i : i + batch], images):
            provenance.write_png(
                png_path(out, seed), np.ascontiguousarray(im.transpose(1, 2, 0)), {**prov, "seeds": str(int(seed))}
            )
    return len(seeds)
