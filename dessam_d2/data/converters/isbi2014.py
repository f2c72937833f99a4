"""ISBI 2014 overlapping cervical cytology (.mat) → grayscale PNGs + COCO JSON.

Input (``--input``): one folder of ``.mat`` files.
    * training: ``isbi_train.mat`` (variable ``ISBI_Train``: cell array of images) and
      ``isbi_train_GT.mat`` (``train_Nuclei``: cell array with one binary nuclei mask per image);
    * test: every other ``.mat`` file of the folder (the 900 synthetic test images, MATLAB v7.3).
Either set may be absent; at least one must be there.

Both MAT formats are read: v5 with ``scipy.io.loadmat`` and v7.3 (HDF5) with h5py, where a cell
array is a dataset of object references and every array is stored transposed (MATLAB is
column-major), which ``_h5_element`` undoes. A "stack" is a variable holding a set of 2-D images:
a cell array of 2-D numeric arrays, or a 3-D numeric array in MATLAB's H x W x N order. A stack is
a *mask* stack when its first element holds only 0/1 (or is logical). Test variable names are not
reliably documented, so: image stacks = non-mask stacks; nuclei stacks = mask stacks whose name
does not mention "cyto" (those whose name mentions "nucle" win if any). If there is not exactly
one of each, name them with ``images_vars`` / ``nuclei_vars`` (``VAR`` or ``FILE.mat:VAR``,
several are concatenated in the given order); otherwise the error lists the stacks found.

Instances: connected components of each nuclei mask with 8-connectivity (diagonal neighbours join,
so a nucleus outline drawn one pixel wide stays one nucleus); touching nuclei that share one
component in the ground truth stay one instance, as in the original masks. Components smaller
than ``min_area`` pixels are skipped and counted. Segmentation is compressed RLE; ``bbox`` and
``area`` come from pycocotools on that RLE.

Images: uint8 kept; logical → 0/255; floating data in [0, 1] → ×255; anything else → per-image
min–max (``image_io.to_uint8``). Written as single-channel PNG (``train/00000.png``, ...);
``read_image_rgb`` repeats gray to 3 channels for SAM.

Output (``--output``, usually ``$DETECTRON2_DATASETS/isbi2014``)::

    train/*.png  test/*.png  annotations/train.json  annotations/test.json
"""

import functools
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import h5py
import numpy as np
import pycocotools.mask as mask_util
import scipy.io
from scipy import ndimage
from tqdm import tqdm

from ...errors import ISBIFormatError
from ...utils.io import atomic_write_bytes, atomic_write_json
from ..image_io import to_uint8
from .conversion import ConversionReport, SubsetReport, nucleus_categories

__all__ = ["MatStack", "list_mat_stacks", "convert_isbi2014"]

# Written into each file's "info": the module's name before it moved to converters/, kept so
# that converted files stay byte-identical across versions (split: it names no module now).
_CONVERTER = "dessam_d2" ".data.isbi2014"

logger = logging.getLogger(__name__)

TRAIN_IMAGES = ("isbi_train.mat", "ISBI_Train")
TRAIN_NUCLEI = ("isbi_train_GT.mat", "train_Nuclei")
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass
class MatStack:
    """A variable that holds a set of 2-D arrays; ``read(i)`` returns element i as H x W."""

    file: str
    name: str
    count: int
    shape: Tuple[int, ...]  # of the first element
    dtype: str
    is_mask: bool
    read: Callable[[int], np.ndarray]

    @property
    def label(self) -> str:
        return f"{os.path.basename(self.file)}:{self.name}"

    def describe(self) -> str:
        kind = "mask" if self.is_mask else "image"
        return (
            f"{self.label} ({self.count} x {'x'.join(map(str, self.shape))} {self.dtype}, {kind})"
        )


def _is_2d_numeric(a: object) -> bool:
    return (
        isinstance(a, np.ndarray)
        and a.ndim == 2
        and a.size > 0
        and (np.issubdtype(a.dtype, np.number) or a.dtype == bool)
    )


def _looks_binary(a: np.ndarray) -> bool:
    return a.dtype == bool or bool(np.isin(a, (0, 1)).all())


def _stack(path: str, name: str, count: int, first: np.ndarray, read: Callable) -> MatStack:
    return MatStack(
        path, name, count, tuple(first.shape), str(first.dtype), _looks_binary(first), read
    )


def _last_axis(stack: np.ndarray, index: int) -> np.ndarray:
    return stack[..., index]


def _stacks_v5(path: str) -> List[MatStack]:
    try:
        data = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several unrelated types on corrupt files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ISBIFormatError(f"{path}: cannot read MAT file ({reason})") from e
    stacks = []
    for name, value in data.items():
        if name.startswith("__") or not isinstance(value, np.ndarray):
            continue
        if value.dtype == object:
            cells = value.flatten(order="F")  # MATLAB's linear (column-major) order
            if len(cells) and all(_is_2d_numeric(c) for c in cells):
                stacks.append(_stack(path, name, len(cells), cells[0], cells.__getitem__))
        elif value.ndim == 3 and _is_2d_numeric(value[..., 0]):
            read = functools.partial(_last_axis, value)
            stacks.append(_stack(path, name, value.shape[2], read(0), read))
    return stacks


def _from_h5(dataset: h5py.Dataset, index: Optional[int] = None) -> np.ndarray:
    """A MATLAB array (or slice ``index`` of a stack) from HDF5: transposed back to MATLAB's
    order, logicals restored (MATLAB stores them as uint8 with a class attribute)."""
    array = np.asarray(dataset[()] if index is None else dataset[index]).T
    if dataset.attrs.get("MATLAB_class", b"") in (b"logical", "logical"):
        array = array.astype(bool)
    return array


def _stacks_v73(path: str, stack: ExitStack) -> List[MatStack]:
    try:
        f = stack.enter_context(h5py.File(path, "r"))
    except OSError as e:
        raise ISBIFormatError(f"{path}: cannot read MAT v7.3 (HDF5) file ({e})") from e
    stacks = []
    for name, obj in f.items():
        if name.startswith("#") or not isinstance(obj, h5py.Dataset):
            continue
        if h5py.check_dtype(ref=obj.dtype) is not None:  # cell array
            refs = obj[()].reshape(-1)  # C order of the transposed array = MATLAB linear order
            if obj.attrs.get("MATLAB_empty", 0) or len(refs) == 0:
                continue
            first = _from_h5(f[refs[0]])
            if _is_2d_numeric(first):
                read = functools.partial(_read_h5_cell, f, refs)
                stacks.append(_stack(path, name, len(refs), first, read))
        elif obj.ndim == 3 and obj.dtype.kind in "biuf":  # H x W x N stored as N x W x H
            read = functools.partial(_from_h5, obj)
            stacks.append(_stack(path, name, obj.shape[0], read(0), read))
    return stacks


def _read_h5_cell(f: h5py.File, refs: np.ndarray, index: int) -> np.ndarray:
    return _from_h5(f[refs[index]])


def list_mat_stacks(path: str, stack: ExitStack) -> List[MatStack]:
    """All image/mask stacks of one .mat file; HDF5 files stay open until ``stack`` closes."""
    if os.path.getsize(path) == 0:
        raise ISBIFormatError(f"{path}: MAT file is empty (0 bytes); re-copy it")
    return _stacks_v73(path, stack) if h5py.is_hdf5(path) else _stacks_v5(path)


def _select(
    stacks: List[MatStack], wanted: Sequence[str], is_mask: bool, what: str, where: str
) -> List[MatStack]:
    if wanted:
        chosen = []
        for spec in wanted:
            hits = [s for s in stacks if spec in (s.name, s.label)]
            if len(hits) != 1:
                listing = "; ".join(s.describe() for s in stacks) or "none"
                reason = "not found" if not hits else "found in several files, use FILE.mat:VAR"
                raise ISBIFormatError(
                    f"{where}: {what} variable '{spec}' {reason}; stacks: {listing}"
                )
            chosen.append(hits[0])
        return chosen
    candidates = [s for s in stacks if s.is_mask == is_mask]
    if is_mask:
        candidates = [s for s in candidates if "cyto" not in s.name.lower()]
        named = [s for s in candidates if "nucle" in s.name.lower()]
        candidates = named or candidates
    if len(candidates) != 1:
        listing = "; ".join(s.describe() for s in stacks) or "none"
        raise ISBIFormatError(
            f"{where}: cannot tell which variable holds the {what} ({len(candidates)} candidates);"
            f" stacks found: {listing}; pass --{'nuclei' if is_mask else 'images'}-var"
        )
    return candidates


class _Concat:
    """Several stacks read as one sequence."""

    def __init__(self, stacks: List[MatStack]):
        self.parts = [(s, i) for s in stacks for i in range(s.count)]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index: int) -> np.ndarray:
        stack, i = self.parts[index]
        return stack.read(i)


def _image_to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype.kind == "f" and np.nanmin(image) >= 0 and np.nanmax(image) <= 1:
        return np.rint(np.nan_to_num(image) * 255).astype(np.uint8)
    return to_uint8(image)


def _convert_split(
    split: str,
    images: _Concat,
    masks: _Concat,
    output: str,
    min_area: int,
    progress: bool,
) -> Tuple[SubsetReport, str]:
    report = SubsetReport(f"isbi2014/{split}")
    image_records, ann_records = [], []
    for index in tqdm(range(len(images)), desc=report.name, unit="img", disable=not progress):
        image, mask = images[index], masks[index]
        if image.shape != mask.shape:
            logger.warning(
                "%s: image %d is %s but its mask is %s; skipped",
                report.name,
                index,
                image.shape,
                mask.shape,
            )
            report.skipped_images["mask size differs"] += 1
            continue
        file_name = f"{split}/{index:05d}.png"
        ok, png = cv2.imencode(".png", _image_to_uint8(image))
        assert ok, "OpenCV could not encode a PNG"
        atomic_write_bytes(os.path.join(output, file_name), png.tobytes())
        image_id = len(image_records) + 1
        h, w = image.shape
        image_records.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        report.images += 1

        components, count = ndimage.label(mask > 0, structure=_EIGHT_CONNECTED)
        for k in range(1, count + 1):
            rle = mask_util.encode(np.asfortranarray((components == k).astype(np.uint8)))
            area = int(mask_util.area(rle))
            if area < min_area:
                report.skipped_nuclei["smaller than min area"] += 1
                continue
            ann_records.append(
                {
                    "id": len(ann_records) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                }
            )
            report.nuclei += 1
    json_file = os.path.join(output, "annotations", f"{split}.json")
    atomic_write_json(
        json_file,
        {
            "info": {"description": f"ISBI 2014 {split}, converted by {_CONVERTER}"},
            "images": image_records,
            "annotations": ann_records,
            "categories": nucleus_categories(),
        },
    )
    return report, json_file


def convert_isbi2014(
    input_dir: str,
    output_dir: str,
    *,
    images_vars: Sequence[str] = (),
    nuclei_vars: Sequence[str] = (),
    min_area: int = 1,
    progress: bool = True,
) -> ConversionReport:
    """Convert the training and/or test .mat files of ``input_dir`` (see the module doc)."""
    if not os.path.isdir(input_dir):
        raise ISBIFormatError(f"{input_dir}: input folder not found; pass the folder of .mat files")
    files = {
        n.lower(): os.path.join(input_dir, n)
        for n in sorted(os.listdir(input_dir))
        if n.lower().endswith(".mat")
    }
    if not files:
        raise ISBIFormatError(f"{input_dir}: no .mat files found")
    train_img, train_gt = files.get(TRAIN_IMAGES[0].lower()), files.get(TRAIN_NUCLEI[0].lower())
    test_files = [p for n, p in files.items() if p not in (train_img, train_gt)]
    report = ConversionReport()
    with ExitStack() as stack:
        jobs = []
        if train_img and train_gt:
            img_stacks, gt_stacks = list_mat_stacks(train_img, stack), list_mat_stacks(
                train_gt, stack
            )
            images = [s for s in img_stacks if s.name == TRAIN_IMAGES[1]] or _select(
                img_stacks, (), False, "training images", train_img
            )
            nuclei = [s for s in gt_stacks if s.name == TRAIN_NUCLEI[1]] or _select(
                gt_stacks, (), True, "training nuclei masks", train_gt
            )
            jobs.append(("train", images, nuclei))
        elif train_img or train_gt:
            raise ISBIFormatError(
                f"{input_dir}: found {os.path.basename(train_img or train_gt)} without "
                f"{TRAIN_NUCLEI[0] if train_img else TRAIN_IMAGES[0]}; both are needed for training"
            )
        if test_files:
            stacks = [s for path in test_files for s in list_mat_stacks(path, stack)]
            where = (
                f"{input_dir} (test files: {', '.join(os.path.basename(p) for p in test_files)})"
            )
            images = _select(stacks, images_vars, False, "test images", where)
            nuclei = _select(stacks, nuclei_vars, True, "test nuclei masks", where)
            jobs.append(("test", images, nuclei))
        for split, images, nuclei in jobs:
            image_seq, mask_seq = _Concat(images), _Concat(nuclei)
            if len(image_seq) != len(mask_seq):
                raise ISBIFormatError(
                    f"{input_dir}: {split} has {len(image_seq)} images "
                    f"({', '.join(s.label for s in images)}) but {len(mask_seq)} nuclei masks "
                    f"({', '.join(s.label for s in nuclei)}); "
                    "pass matching --images-var/--nuclei-var"
                )
            logger.info(
                "%s: images from %s, nuclei from %s",
                split,
                ", ".join(s.label for s in images),
                ", ".join(s.label for s in nuclei),
            )
            sub_report, json_file = _convert_split(
                split, image_seq, mask_seq, output_dir, min_area, progress
            )
            report.subsets.append(sub_report)
            report.json_files.append(json_file)
    return report
