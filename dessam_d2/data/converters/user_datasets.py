"""Your own COCO box files as data sets, by name, from the command line (``--dataset``).

``NAME=JSON[:IMAGE_ROOT]`` registers ``JSON`` (COCO instances: ``images``, ``annotations``,
``categories``) under ``NAME``; the images' ``file_name`` are relative to ``IMAGE_ROOT`` (default:
the JSON's folder) and may hold sub-folders. Files as CVAT ("COCO 1.0") and Label Studio
("COCO") export boxes load as they are: empty ``segmentation``, any category names and ids
(Label Studio counts from 0), extra keys such as ``attributes`` or ``ignore: 0``. DES-SAM is
single-class, so every category counts as "nucleus"; polygons or RLEs, where present, are kept
for evaluation (the training mapper never reads them).
"""

import json
import os
from typing import Dict, Sequence, Tuple

from ...errors import DatasetFormatError, DatasetNotFoundError, UsageError
from ..datasets import register_nuclei_coco

__all__ = [
    "parse_dataset_spec",
    "check_coco_file",
    "read_coco_instances",
    "register_user_datasets",
    "require_outlines",
    "boxes_only",
]


def parse_dataset_spec(spec: str) -> Tuple[str, str, str]:
    """``NAME=JSON[:IMAGE_ROOT]`` -> (name, json file, image root)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise UsageError(
            f"--dataset {spec!r}: write NAME=JSON or NAME=JSON:IMAGE_ROOT, "
            "e.g. my_train=boxes.json:images/"
        )
    json_file, image_root = rest, ""
    split = rest.lower().rfind(".json:")
    if split >= 0:
        json_file, image_root = rest[: split + 5], rest[split + 6 :]
    return name, json_file, image_root or os.path.dirname(json_file) or "."


def read_coco_instances(path: str, fix: str, prefix: str = "") -> Dict:
    """``path`` read as COCO instances (a dict with the lists images, annotations, categories);
    otherwise a one-line ``DatasetFormatError``: ``prefix``, what is wrong, then ``fix``."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{prefix}{path} is not JSON ({e}); {fix}") from None
    if not isinstance(coco, dict) or not all(
        isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetFormatError(
            f"{prefix}{path} is not a COCO instances file (it needs the lists 'images', "
            f"'annotations' and 'categories'); {fix}"
        )
    return coco


def check_coco_file(name: str, json_file: str, image_root: str) -> Dict:
    """Read ``json_file`` and check it is COCO instances whose images exist under
    ``image_root``; a one-line ``DatasetFormatError`` / ``DatasetNotFoundError`` otherwise."""
    if not os.path.isfile(json_file):
        raise DatasetNotFoundError(
            f"--dataset {name}: {json_file} not found; give the path of the COCO file your "
            "annotation tool exported"
        )
    fix = "export COCO from your annotation tool, or convert QuPath GeoJSON with "
    fix += "tools/import_qupath.py"
    coco = read_coco_instances(json_file, fix, prefix=f"--dataset {name}: ")
    if not coco["images"]:
        raise DatasetFormatError(f"--dataset {name}: {json_file} lists no images")
    if not os.path.isdir(image_root):
        raise DatasetNotFoundError(
            f"--dataset {name}: image folder {image_root} does not exist; write "
            f"{name}={json_file}:<folder the images' file_name are relative to>"
        )
    try:
        missing = [
            im["file_name"]
            for im in coco["images"]
            if not os.path.isfile(os.path.join(image_root, im["file_name"]))
        ]
    except (KeyError, TypeError):
        raise DatasetFormatError(
            f"--dataset {name}: {json_file}: every entry of 'images' needs a 'file_name'"
        ) from None
    if missing:
        raise DatasetNotFoundError(
            f"--dataset {name}: {len(missing)} of {len(coco['images'])} images of {json_file} "
            f"are not under {image_root} (first: {missing[0]}); write "
            f"{name}={json_file}:<folder the images' file_name are relative to>"
        )
    return coco


def boxes_only(coco: Dict) -> bool:
    """True when no non-crowd annotation carries an outline (nuclei metrics need outlines)."""
    return not any(a.get("segmentation") for a in coco["annotations"] if not a.get("iscrowd", 0))


def register_user_datasets(specs: Sequence[str]) -> Dict[str, bool]:
    """Check and register every ``NAME=JSON[:IMAGE_ROOT]``; returns {name: has outlines}. Call
    it in every process that builds data loaders (inside the function ``launch`` runs)."""
    registered = {}
    for spec in specs:
        name, json_file, image_root = parse_dataset_spec(spec)
        coco = check_coco_file(name, json_file, image_root)
        register_nuclei_coco(name, json_file, image_root, any_category=True)
        registered[name] = not boxes_only(coco)
    return registered


def require_outlines(test_names: Sequence[str], registered: Dict[str, bool]) -> None:
    """Evaluation (Dice, AJI, PQ, mask AP) compares outlines: a boxes-only test set is an error
    before training starts, not after it ends."""
    for name in test_names:
        if registered.get(name) is False:
            raise DatasetFormatError(
                f"DATASETS.TEST: data set '{name}' has boxes only, and evaluation compares "
                "outlines; annotate its nuclei as polygons (CVAT, Label Studio, QuPath via "
                "tools/import_qupath.py) or set DATASETS.TEST () to train without evaluating"
            )
