"""Atomic file writes, used by every module that writes results, samples or checkpoints, and the image
files guidelab writes (uint8 conversion, class grids, PNG)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The bytes go to a temporary ``.<name>.tmp<pid>.*`` file in the same folder (:func:`stale_temps` finds
    those whose writer is gone), are fsynced and renamed over
    ``path`` (``os.replace``): a killed process leaves the old file or the new one, never a partial one.
    The file gets the permissions a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp{os.getpid()}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data) if isinstance(data, (bytes, bytearray)) else data(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


_TEMP = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)\..*")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporary files of :func:`atomic_write` in ``folder`` (of target ``name``, or any) whose writing
    process is gone (its pid is not alive on this host): safe to delete. A live writer's file is never listed."""
    out = []
    for p in Path(folder).glob(".*.tmp*"):
        m = _TEMP.fullmatch(p.name)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            out.append(p)
    return out


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file; of a folder, of its files' relative names and contents (sorted; hidden files skipped)."""
    path, h = Path(path), hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(
            f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
    )
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` block; yields whether
    it was taken (``blocking=False``: False when another process holds it). The kernel drops the lock
    when its holder dies, so a killed job never leaves a folder locked. Network file systems: flock is
    honoured by NFSv4 and Lustre/GPFS with locking on; on file systems without it writers are not
    serialised (docs/RELIABILITY.md)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_uint8(x: ArrayLike | torch.Tensor) -> np.ndarray:
    """Images [..., C, H, W] in [-1, 1] (numpy or torch) -> uint8 [..., H, W, C] (clipped, rounded)."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.moveaxis(np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8), -3, -1)


def class_grid(
    x: ArrayLike | torch.Tensor, labels: ArrayLike | None, seeds: ArrayLike, per_row: int = 10, scale: int = 4
) -> np.ndarray:
    """uint8 grid [H, W, C] of images [N, C, H, W] in [-1, 1]: one row per class (its first ``per_row``
    samples by seed), or without labels the first ``per_row^2`` samples; cells upscaled ``scale``x with a
    2-pixel grey gap."""
    order = np.argsort(np.asarray(seeds), kind="stable")
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)[order]
    if labels is None:
        rows = [x[i * per_row : (i + 1) * per_row] for i in range(min(per_row, -(-len(x) // per_row)))]
    else:
        labels = np.asarray(labels)[order]
        rows = [x[labels == c][:per_row] for c in np.unique(labels)]
    img = to_uint8(np.concatenate(rows)) if rows else np.zeros((0, 1, 1, 1), np.uint8)
    h, w, ch = img.shape[1:]
    img = img.repeat(scale, 1).repeat(scale, 2)
    cell_h, cell_w = h * scale + 2, w * scale + 2
    grid = np.full((len(rows) * cell_h, per_row * cell_w, ch), 128, dtype=np.uint8)
    k = 0
    for i, r in enumerate(rows):
        for j in range(len(r)):
            grid[i * cell_h : i * cell_h + h * scale, j * cell_w : j * cell_w + w * scale] = img[k]
            k += 1
    return grid


def png_name(seed: int) -> str:
    """The one PNG naming of every command that writes a PNG per sample: ``<seed:09d>.png`` (seeds up to 10^9
    sort by name)."""
    return f"{int(seed):09d}.png"


def png_bytes(img: np.ndarray) -> bytes:
    """A uint8 image [H, W, C] (C = 1 grey, 3 RGB) encoded as PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Atomically write a uint8 image [H, W, C] (C = 1 grey, 3 RGB) as PNG."""
    return atomic_write(path, png_bytes(img))
