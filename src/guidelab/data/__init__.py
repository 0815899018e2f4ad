"""Image data sets as tensors: ``images`` [N, C, H, W] in [-1, 1] (float32), ``labels`` [N] (int64) or None."""

from .digits import DIGITS_CLASSES, digits
from .folder import IMAGE_SUFFIXES, ImageData, folder_channels, image_folder

__all__ = ["ImageData", "digits", "DIGITS_CLASSES", "image_folder", "folder_channels", "IMAGE_SUFFIXES"]
