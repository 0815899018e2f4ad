"""Provenance: what produced an output file, recorded in every file guidelab's commands write.

:func:`collect` returns one flat ``{name: string}`` dict: guidelab version, git commit (when the
package runs from a git checkout), the exact command line, Python / torch versions, the device, the CPU
(model, torch's kernel set, MKL's reproducibility branch: float results depend on them), and
whatever the writer adds (model files with their sha256, sampler, steps, schedule, seeds, guider and
options, ...). Every writer stores it under the key ``provenance`` (results.json, metrics.json,
job.json) or as PNG text chunks (:func:`write_png`, :func:`stamp_png`); the HTML report renders the
``provenance`` key of results.json.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: The command line of this process (the CLI sets it from its own arguments; default: sys.argv).
_COMMAND: list[str] | None = None
#: Fields every provenance dict has.
BASE_FIELDS = ("guidelab_version", "git_commit", "command", "python", "torch", "device", "cpu")


def set_command(argv) -> None:
    """Record the command line of this run (``guidelab`` + its arguments)."""
    global _COMMAND
    _COMMAND = [str(a) for a in argv]


def command() -> str:
    argv = (
        _COMMAND if _COMMAND is not None else ["guidelab" if Path(sys.argv[0]).name == "guidelab" else sys.argv[0], *sys.argv[1:]]
    )
    return shlex.join(argv)


@functools.lru_cache(None)
def git_commit() -> str:
    """The commit of the checkout guidelab runs from (``+dirty`` when it has local changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return "unknown (not a git checkout)"
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return head + ("+dirty" if dirty else "")


@functools.lru_cache(256)
def _sha256(path: str, mtime_ns: int, size: int, inode: int) -> str:
    from .._io import sha256

    return sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (or a run folder's files), cached per path and modification time."""
    p = Path(path)
    st = p.stat()
    return _sha256(str(p), st.st_mtime_ns, st.st_size, st.st_ino)


def files(**paths: str | os.PathLike | None) -> dict[str, str]:
    """``{name: path, name_sha256: hash}`` for each given path that exists (None skipped)."""
    out = {}
    for name, p in paths.items():
        if p is None:
            continue
        out[name] = str(p)
        out[f"{name}_sha256"] = file_sha256(p) if Path(p).exists() else "missing"
    return out


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (Mapping, list, tuple)):
        return json.dumps(v, sort_keys=isinstance(v, Mapping), default=str)
    return str(v)


def seeds_text(seeds) -> str:
    """``0-4095`` for consecutive seeds, else a comma-separated list."""
    s = [int(v) for v in np.asarray(seeds).reshape(-1)]
    if not s:
        return ""
    if s == list(range(s[0], s[0] + len(s))):
        return f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0])
    return ",".join(map(str, s))


@functools.lru_cache(None)
def cpu() -> str:
    """The CPU and the kernels torch picks on it: ``AMD EPYC ... (x86_64; torch kernels AVX512; MKL_CBWR unset)``.
    Training on another CPU model or kernel set agrees only to float rounding, unless ``MKL_CBWR=COMPATIBLE``
    pins MKL's code path (docs/RELIABILITY.md "Determinism")."""
    import torch

    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [platform.machine(), f"torch kernels {torch.backends.cpu.get_cpu_capability()}"]
    if torch.backends.mkl.is_available():
        parts.append(f"MKL_CBWR {os.environ.get('MKL_CBWR') or 'unset'}")
    return f"{name or 'unknown CPU'} ({'; '.join(parts)})"


def collect(*, device: Any = "cpu", **fields: Any) -> dict[str, str]:
    """The provenance dict: :data:`BASE_FIELDS` and ``fields`` (None dropped), every value a string."""
    import torch

    from .. import __version__

    out = {
        "guidelab_version": __version__,
        "git_commit": git_commit(),
        "command": command(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": cpu(),
    }
    out.update({k: _text(v) for k, v in fields.items() if v is not None})
    return out


def of_job(job, *, seeds=None, device: Any = "cpu", **extra: Any) -> dict[str, str]:
    """Provenance of a sampling job (:class:`guidelab.app.jobs.Sampling`): its model files with hashes,
    sampler, steps, schedule, guider, weight, interval, options, label, and ``seeds``."""
    cfg, d = job.cfg, job.describe()
    return collect(
        device=device,
        **files(model=cfg.model, guide=cfg.guide),
        world=cfg.world,
        sampler=d["sampler"],
        sampler_options=cfg.sampler_options or None,
        steps=d["steps"],
        schedule=d["schedule"],
        dtype=cfg.dtype,
        guider=cfg.guider,
        weight=cfg.w,
        interval=d["interval"],
        guider_options=cfg.guider_options or None,
        label=cfg.label,
        unconditional=cfg.unconditional or None,
        seeds=None if seeds is None else seeds_text(seeds),
        **extra,
    )


def png_info(prov: Mapping[str, str]):
    """PIL PngInfo with the provenance dict as JSON in one compressed text chunk ``guidelab:provenance``
    (read back with :func:`read_png`), and ``Software`` (the standard key) naming guidelab's version."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", f"guidelab {prov.get('guidelab_version', '')}".strip())
    info.add_text("guidelab:provenance", json.dumps(dict(prov), sort_keys=True), zip=True)
    return info


def png_bytes(img: np.ndarray, prov: Mapping[str, str] | None) -> bytes:
    """A uint8 image [H, W, C] (C = 1 grey, 3 RGB) as PNG bytes, with ``prov`` in text chunks."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(
        buf, format="PNG", pnginfo=None if prov is None else png_info(prov)
    )
    return buf.getvalue()


def write_png(path: str | os.PathLike, img: np.ndarray, prov: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``img`` as PNG with ``prov`` in its text chunks."""
    from .._io import atomic_write

    return atomic_write(path, png_bytes(img, prov))


def stamp_png(path: str | os.PathLike, prov: Mapping[str, str]) -> Path:
    """Rewrite an existing PNG (atomically) with ``prov`` in its text chunks; pixels unchanged."""
    import io

    from PIL import Image

    from .._io import atomic_write

    with Image.open(path) as im:
        im.load()
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=png_info(prov))
    return atomic_write(path, buf.getvalue())


def read_png(path: str | os.PathLike) -> dict[str, str]:
    """The provenance dict stored in a PNG by :func:`write_png` / :func:`stamp_png` ({} if none)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    raw = text.get("guidelab:provenance")
    return json.loads(raw) if raw else {}
