"""Images from a folder (PNG / JPEG via Pillow), optionally one sub-folder per class.

Layouts: ``root/*.png`` (unlabelled) or ``root/<class>/*.png`` (class names are the sub-folder names,
sorted; labels are their indices). Files are read in sorted order, so the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GuidelabError, check

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageData:
    """``images`` [N, C, H, W] float32 in [-1, 1]; ``labels`` [N] int64 (None: unlabelled); ``classes`` names."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read(path: Path, mode: str, resolution: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise GuidelabError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return a[:, :, None] if a.ndim == 2 else a


def folder_channels(root: str | Path) -> int | None:
    """3 when any image under ``root`` has colour (R, G, B not all equal), 1 when all are grey (an RGB file
    with equal channels is grey); None when there is no image or one cannot be read (the loader reports it)."""
    from PIL import Image

    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        return None
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                    continue
                a = np.asarray(im.convert("RGB"))
        except Exception:  # the loader reports unreadable images
            return None
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])):
            return 3
    return 1


def image_folder(root: str | Path, resolution: int | None = None, channels: int | None = None) -> ImageData:
    """Load every PNG / JPEG under ``root`` as [N, channels, H, W] in [-1, 1].

    ``resolution``: resize every image to ``resolution x resolution`` (bicubic; aspect ratio not kept);
    ``None`` keeps the sizes, which must then all be equal. ``channels``: 1 (grey) or 3 (RGB); ``None``
    (default): read from the images (:func:`folder_channels`).
    """
    root = Path(root)
    check(root.is_dir(), f"image folder {root} does not exist or is not a folder")
    if channels is None:
        channels = folder_channels(root) or 3
    check(channels in (1, 3), f"channels must be 1 or 3, got {channels!r}")
    check(
        resolution is None or (isinstance(resolution, int) and resolution >= 1),
        f"resolution must be an integer >= 1 or None, got {resolution!r}",
    )
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        check(not _files(root), f"{root} mixes images and class sub-folders; put every image in a class sub-folder")
        classes = [d.name for d in subdirs]
        empty = [d.name for d in subdirs if not _files(d)]
        check(not empty, f"class sub-folder(s) {empty} of {root} hold no images; remove them or add images")
        files = [(f, i) for i, d in enumerate(subdirs) for f in _files(d)]
    else:
        classes = []
        files = [(f, -1) for f in _files(root)]
    check(len(files) > 0, f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    mode = "L" if channels == 1 else "RGB"
    arrays: list[np.ndarray] = []
    for f, _ in files:
        a = _read(f, mode, resolution)
        if arrays and a.shape != arrays[0].shape:
            raise GuidelabError(
                f"images have different sizes ({files[0][0].name}: {arrays[0].shape[1]}x{arrays[0].shape[0]}, "
                f"{f.name}: {a.shape[1]}x{a.shape[0]}); pass a resolution to resize them"
            )
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = torch.tensor([i for _, i in files], dtype=torch.int64) if classes else None
    return ImageData(x.contiguous(), labels, classes)
