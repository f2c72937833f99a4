"""Read any nucleus image as H x W x 3 uint8 RGB, the only input SAM accepts.

Conversions, applied in this order:
    * EXIF orientation is applied (JPEG/PNG), as labelme and Detectron2 do, so annotations drawn
      on the displayed image line up with the pixels.
    * grayscale (H x W or H x W x 1) is repeated to 3 channels; gray + alpha keeps the gray.
    * RGBA: the alpha channel is dropped (not composited: microscopy alpha is usually constant).
    * bool images map False/True to 0/255.
    * any dtype other than uint8 (16-bit, 32-bit integer, float) is scaled per image, linearly,
      from [min, max] of the whole image (all channels together, so colour balance is kept) to
      [0, 255] and rounded; a constant image becomes all zeros; NaN becomes 0.
TIFF files are read with tifffile (which keeps 16-bit and float data intact); everything else with
Pillow, which raises on truncated files instead of returning half-grey pixels like OpenCV does;
16-bit colour PNGs, of which Pillow keeps only the high byte, are decoded by OpenCV.
"""

import os
from typing import Union

import cv2
import numpy as np
import tifffile
from PIL import Image, ImageOps

from ..errors import ImageNotFoundError, ImageReadError
from ..utils.io import atomic_write_bytes

__all__ = ["read_image_rgb", "array_to_rgb", "to_uint8", "write_image_rgb"]

_TIFF_SUFFIXES = (".tif", ".tiff")
# Pillow modes whose pixels np.asarray returns faithfully (other modes are converted first).
_DIRECT_MODES = {"L", "LA", "RGB", "RGBA", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Per-image min-max linear scaling of any numeric array to uint8 (uint8 passes unchanged)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _decode_opencv(path: str) -> np.ndarray:
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("OpenCV could not decode it")
    if array.ndim == 3:  # BGR(A) -> RGB(A)
        array = array[..., [2, 1, 0, 3][: array.shape[2]]]
    return array


def _rawmode(img: Image.Image) -> str:
    return str(img.tile[0][3]) if img.tile else ""


def _decode_pillow(path: str) -> np.ndarray:
    with Image.open(path) as img:
        if img.format == "PNG" and img.mode in ("RGB", "RGBA", "LA") and ";16" in _rawmode(img):
            # Pillow keeps only the high byte of 16-bit colour PNGs; OpenCV reads all 16 bits
            return _decode_opencv(path)
        img.load()  # decode now: truncated data raises here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode not in _DIRECT_MODES:
            # palette, CMYK, YCbCr, ...: let Pillow produce RGB(A)
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return np.array(img)


def _decode_tiff(path: str) -> np.ndarray:
    array = np.squeeze(tifffile.imread(path))
    if array.size == 0:  # tifffile only warns when the page directory is cut off
        raise ValueError("no image data")
    # channel-first TIFFs (C x H x W) are common in microscopy
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)
    return array


def _to_rgb(array: np.ndarray, path: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 2:  # gray + alpha
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
        raise ImageReadError(
            f"{path}: unsupported image layout {tuple(array.shape)}; "
            "save it as a single 2-D grayscale, RGB or RGBA image"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ImageReadError(f"{path}: unsupported pixel type {array.dtype}; save it as 8/16 bit")
    return np.ascontiguousarray(to_uint8(array))


def array_to_rgb(array: np.ndarray, name: str = "image") -> np.ndarray:
    """An image array already in memory (e.g. a napari layer's data) as H x W x 3 uint8 RGB,
    by the same conversions as ``read_image_rgb``; ``name`` is what an error calls it."""
    return _to_rgb(np.asarray(array), name)


def write_image_rgb(path: str, image: np.ndarray) -> None:
    """Write an H x W x 3 uint8 RGB image as PNG, atomically (a temporary name, then renamed)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path} as PNG")
    atomic_write_bytes(path, png.tobytes())


def read_image_rgb(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 RGB array (conversions: see the module doc).

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageReadError: the file is empty, truncated, not an image, or of an unsupported layout.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageNotFoundError(f"{path}: image file not found")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"{path}: image file is empty (0 bytes); re-copy or delete it")
    try:
        if path.lower().endswith(_TIFF_SUFFIXES):
            array = _decode_tiff(path)
        else:
            array = _decode_pillow(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(
            f"{path}: cannot decode image ({reason}); the file is truncated or not an image"
        ) from e
    return _to_rgb(array, path)
