"""``guidelab inverse``: solve one inverse task for one image with an unconditional model (files in, files out).

Everything is checked before anything is written (input readable and finite, ``OUT`` not a file, samples
finite); each output file is written atomically (``guidelab._io.atomic_write``): ``samples.npz``,
``grid.png`` and ``run.json`` (the settings and the counted NFE per sample).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, to_uint8, write_png
from ..errors import GuidelabError, check
from ..inverse import Counting, tasks
from ..log import get_logger

log = get_logger(__name__)


def load_model(model: str):
    """A checkpoint / run folder / EDM2 pickle (``training.phema.load_network``), or ``digits-gmm`` (the exact
    8x8 digits world of ``toy.digits_gmm`` as a denoiser of [B, 1, 8, 8] images)."""
    if model == "digits-gmm":
        from ..toy import digits_gmm

        world = digits_gmm()
        return lambda x, sigma, **cond: world(x.flatten(1), sigma).view_as(x)
    from ..training.phema import load_network

    net = load_network(model)
    net.eval().requires_grad_(False)
    return net


def load_image(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """A PNG / JPEG (grey or RGB, to [C, H, W] in [-1, 1]) or an ``.npz`` / ``.npy`` array [C, H, W] in [-1, 1]
    (an ``.npz``: its ``x`` array, else its only array; a leading batch axis of 1 is dropped)."""
    path = Path(path)
    check(path.is_file(), f"input not found: {path}")
    if path.suffix in (".npz", ".npy"):
        data = np.load(path)
        if path.suffix == ".npz":
            check("x" in data.files or len(data.files) == 1, f"{path}: an .npz needs an array 'x' (has {data.files})")
            data = data["x" if "x" in data.files else data.files[0]]
        a = torch.as_tensor(np.asarray(data, dtype=np.float32))
        a = a[0] if a.ndim == 4 and a.shape[0] == 1 else a
        check(a.ndim == 3, f"{path}: the array must be [C, H, W] (or [1, C, H, W]), got {list(a.shape)}")
        check(bool(torch.isfinite(a).all()), f"{path}: the image contains NaN or inf values")
        return a
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB") if channels in (1, 3) else im
            pixels = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise GuidelabError(f"cannot read image {path}: {e}") from None
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels / 127.5 - 1.0, -1, 0)))


def run_inverse(
    model: str,
    task: str,
    method: str,
    input_path: str | Path,
    out: str | Path,
    *,
    n: int = 8,
    seed: int = 0,
    mask: str = "centre",
    factor: int = 2,
    steps: int | None = None,
    sigma_max: float = 80.0,
    progress: bool = True,
    **options,
) -> Path:
    """Write ``OUT/samples.npz`` (``x`` [n, C, H, W], ``truth``, ``y``), ``OUT/grid.png`` (input, the
    observation lifted to image space, then the samples) and ``OUT/run.json`` (settings, ``nfe`` per sample)."""
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    image = load_image(input_path)
    op, y = tasks.make_task(task, image, mask=mask, factor=factor, seed=seed)
    denoiser = Counting(load_model(model))
    x = tasks.solve(denoiser, op, y, method, n=n, seed=seed, steps=steps, sigma_max=sigma_max, progress=progress, **options)
    check(
        bool(torch.isfinite(x).all()),
        f"{method} produced NaN or inf samples (a step size too large?); nothing written",
    )
    shown = torch.cat([image[None], op.pinv(y[None]).reshape(1, *image.shape), x.clamp(-1, 1)])
    cells = to_uint8(shown)  # [n + 2, H, W, C]
    k = max(1, 64 // cells.shape[1])  # small images upscaled to >= 64 px
    cells = cells.repeat(k, 1).repeat(k, 2)
    gap = np.full((cells.shape[1], 2, cells.shape[3]), 128, np.uint8)
    grid = np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1)
    info = {
        "model": str(model),
        "task": task,
        "method": method,
        "input": str(input_path),
        "n": n,
        "seed": seed,
        "mask": mask if task == "inpaint" else None,
        "factor": factor if task in ("superres", "lowpass") else None,
        "steps": steps if steps is not None else tasks.DEFAULTS[method]["steps"],
        "sigma_max": sigma_max,
        "options": {k: v for k, v in options.items() if v is not None},
        "nfe": denoiser.nfe,  # denoiser calls, each over the whole batch: evaluations per sample
        "consistency": float(torch.linalg.vector_norm((op(x) - y).flatten(1), dim=1).mean()),
    }
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy(), truth=image.numpy(), y=y.numpy())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "samples.npz", buf.getvalue())
    write_png(out / "grid.png", grid)
    atomic_write(out / "run.json", (json.dumps(info, indent=2) + "\n").encode())
    log.info("%s %s: %d samples, %d NFE per sample, |Ax - y| %.4g", task, method, n, denoiser.nfe, info["consistency"])
    return out
