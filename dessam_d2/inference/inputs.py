"""What to predict: files, folders (not recursive) and glob patterns, sorted into whole-slide images
and other images."""

import glob
import os
from typing import Iterator, List, Sequence, Tuple

from ..errors import InputNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Vendor formats OpenSlide reads; .tif/.tiff are slides when tiled (OpenSlide's generic-tiff).
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def is_slide(path: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    if ext in SLIDE_EXTENSIONS:
        return True
    if ext in (".tif", ".tiff") and os.path.isfile(path):
        import openslide

        try:
            return openslide.OpenSlide.detect_format(path) is not None
        except openslide.OpenSlideError:
            return False
    return False


def _expand(inputs: Sequence[str]) -> Iterator[Tuple[str, bool]]:
    """(path, named): each file named, then each file of a folder (sorted) or a glob (sorted),
    those found with ``named`` False."""
    for item in inputs:
        if os.path.isdir(item):
            for name in sorted(os.listdir(item)):
                yield os.path.join(item, name), False
        elif any(c in item for c in "*?["):
            for path in sorted(glob.glob(item)):
                yield path, False
        else:
            yield item, True  # a missing file is reported per image, the rest go on


def _no_images(inputs: Sequence[str]) -> InputNotFoundError:
    return InputNotFoundError(f"no images found in {list(inputs)}: give files, folders or globs")


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Files, folders (their images, not recursive) and glob patterns -> sorted unique paths."""
    found = [p for p, named in _expand(inputs) if named or p.lower().endswith(IMAGE_EXTENSIONS)]
    unique = list(dict.fromkeys(os.path.normpath(p) for p in found))
    if not unique:
        raise _no_images(inputs)
    return unique


def split_slides(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(slides, images): ``collect_images``'s images, except that every whole-slide image (a
    vendor format, or a tiled pyramidal .tif found anywhere) goes to the slides, never to an
    image reader. Nothing found at all is an ``InputNotFoundError``."""
    slides, images = [], []
    for path, named in _expand(inputs):
        if is_slide(path):
            slides.append(path)
        elif named or path.lower().endswith(IMAGE_EXTENSIONS):
            images.append(path)
    if not slides and not images:
        raise _no_images(inputs)
    return list(dict.fromkeys(slides)), list(dict.fromkeys(os.path.normpath(p) for p in images))
