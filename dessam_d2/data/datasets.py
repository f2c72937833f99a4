"""Every nuclei data set registered by name, lazily (registration only: the converters are in
``converters/``).

Importing this module registers all names of ``BUILTIN_DATASETS`` under the root
``$DETECTRON2_DATASETS`` (default ``datasets``), read once at import. Nothing is read from disk
until ``DatasetCatalog.get(name)`` is called; a missing JSON then fails with the converter
command to run. The layout is described in ``datasets/README.md``.
"""

import functools
import json
import os
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..errors import DatasetFormatError, DatasetNotFoundError, EmptyDatasetError
from ..utils.io import atomic_write_bytes

__all__ = [
    "BUILTIN_DATASETS",
    "NUCLEUS_CLASSES",
    "default_dataset_root",
    "load_nuclei_coco",
    "register_nuclei_coco",
    "register_all_nuclei_datasets",
    "SUBSET_DATASETS",
    "read_image_list",
    "subset_coco",
    "register_nuclei_subset",
]

NUCLEUS_CLASSES = ["nucleus"]
EVALUATOR_TYPE = "nuclei"

_CNSEG = "python tools/convert_cnseg.py --input <CNSeg root> --output {root}/cnseg"
_ISBI = "python tools/convert_isbi2014.py --input <dir of .mat files> --output {root}/isbi2014"
_SYNTH = "python tools/make_synthetic.py --output {root}/synthetic_cytology (or `make demo`)"

# name -> (json file, image root, command that creates them), paths relative to the root
BUILTIN_DATASETS: Dict[str, Tuple[str, str, str]] = {
    "cnseg_patchseg_train": ("cnseg/patchseg/annotations/train.json", "cnseg/patchseg", _CNSEG),
    "cnseg_patchseg_test": ("cnseg/patchseg/annotations/test.json", "cnseg/patchseg", _CNSEG),
    **{
        f"cnseg_clusterseg_{split}": (
            f"cnseg/clusterseg/annotations/{split}.json",
            "cnseg/clusterseg",
            _CNSEG,
        )
        for split in ("train", "test")
    },
    **{
        f"cnseg_clusterseg_{part}_test": (
            f"cnseg/clusterseg/annotations/test-{part}.json",
            "cnseg/clusterseg",
            _CNSEG,
        )
        for part in ("sample", "normal", "difficult")
    },
    **{
        f"cnseg_domainseg_{target}_test": (
            f"cnseg/domainseg/annotations/{target}.json",
            "cnseg/domainseg",
            _CNSEG,
        )
        for target in ("targeta", "targetb")
    },
    "isbi2014_train": ("isbi2014/annotations/train.json", "isbi2014", _ISBI),
    "isbi2014_test": ("isbi2014/annotations/test.json", "isbi2014", _ISBI),
    **{
        f"dessam_synthetic_{name}": (
            f"synthetic_cytology/{split}/annotations.json",
            f"synthetic_cytology/{split}/images",
            _SYNTH,
        )
        for name, split in (("train", "train"), ("test", "test"), ("shifted_test", "test_shifted"))
    },
}


# name -> (parent data set, list of image file names relative to the root): the parent's images
# named in the list, with their annotations (``register_nuclei_subset``).
SUBSET_DATASETS: Dict[str, Tuple[str, str]] = {
    # The authors' release tests TargetB on 60 of its images; it does not say which (README).
    "cnseg_domainseg_targetb60_test": (
        "cnseg_domainseg_targetb_test",
        "cnseg/domainseg/targetb60.txt",
    ),
}


def default_dataset_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def load_nuclei_coco(
    name: str,
    json_file: str,
    image_root: str,
    how_to_create: str = "",
    any_category: bool = False,
) -> List:
    """``load_coco_json`` with one-line errors for a missing, broken or empty file.

    ``any_category``: every category of the file is "nucleus" (class 0), whatever its name and
    id, e.g. a box file exported by an annotation tool; the file's categories are not read into
    the metadata.
    """
    if not os.path.isfile(json_file):
        hint = f"create it with `{how_to_create}`" if how_to_create else "check the path"
        raise DatasetNotFoundError(
            f"data set '{name}': {json_file} not found; {hint} (see datasets/README.md)"
        )
    try:
        dicts = load_coco_json(json_file, image_root, None if any_category else name)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetFormatError(
            f"data set '{name}': {json_file} is not a valid COCO instances file ({reason}); "
            "re-run the converter that wrote it"
        ) from e
    if any_category:
        for record in dicts:
            for anno in record.get("annotations", []):
                anno["category_id"] = 0
    if not dicts:
        raise EmptyDatasetError(
            f"data set '{name}': {json_file} lists no images; re-run the converter on a "
            "folder that holds images and labels"
        )
    return dicts


def register_nuclei_coco(
    name: str,
    json_file: str,
    image_root: str,
    *,
    how_to_create: str = "",
    any_category: bool = False,
) -> None:
    """Register a single-class ("nucleus") COCO file by name; registering a name again replaces
    it, so re-running a notebook cell or re-importing never raises.

    ``any_category``: all of the file's categories are "nucleus" (see ``load_nuclei_coco``). The
    metadata then has no ``json_file``, so Detectron2's COCOEvaluator scores against the loaded
    (single-class) records, not against the file's own category ids.
    """
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog:
            catalog.remove(name)
    DatasetCatalog.register(
        name,
        functools.partial(
            load_nuclei_coco, name, json_file, image_root, how_to_create, any_category
        ),
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(NUCLEUS_CLASSES),
        image_root=image_root,
        evaluator_type=EVALUATOR_TYPE,
        **({} if any_category else {"json_file": json_file}),
    )


def register_all_nuclei_datasets(root: Optional[str] = None, *, overwrite: bool = False) -> None:
    """Register every name of ``BUILTIN_DATASETS`` under ``root`` (default: the env root).

    Names already registered are left alone unless ``overwrite`` (e.g. to point them elsewhere).
    """
    root = root if root is not None else default_dataset_root()
    for name, (json_rel, image_rel, command) in BUILTIN_DATASETS.items():
        if name in DatasetCatalog and not overwrite:
            continue
        register_nuclei_coco(
            name,
            os.path.join(root, json_rel),
            os.path.join(root, image_rel),
            how_to_create=command.format(root=root),
        )
    for name, (parent, list_rel) in SUBSET_DATASETS.items():
        if name not in DatasetCatalog or overwrite:
            register_nuclei_subset(name, parent, os.path.join(root, list_rel))


# ---------------------------------------------------------------- subsets by a list of images


def read_image_list(path: str) -> List[str]:
    """Image names of a list file: one a line, blank lines and ``#`` comments ignored, repeats
    dropped (order kept)."""
    with open(path, encoding="utf-8") as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    return list(dict.fromkeys(n for n in names if n))


def subset_coco(name: str, parent_json: str, list_file: str) -> Dict:
    """The parent COCO file restricted to the images named in ``list_file`` (by file name, with
    or without its folder or extension)."""
    wanted = read_image_list(list_file)
    if not wanted:
        raise EmptyDatasetError(f"data set '{name}': {list_file} names no image")
    with open(parent_json, encoding="utf-8") as f:
        coco = json.load(f)
    by_key: Dict[str, List[int]] = {}
    for image in coco["images"]:
        base = os.path.basename(image["file_name"])
        for key in {base, os.path.splitext(base)[0]}:
            by_key.setdefault(key, []).append(image["id"])
    missing, ambiguous, ids = [], [], set()
    for entry in wanted:
        found = by_key.get(os.path.basename(entry), [])
        if not found:
            missing.append(entry)
        elif len(found) > 1:
            ambiguous.append(entry)
        else:
            ids.add(found[0])
    if missing or ambiguous:
        problem = missing or ambiguous
        what = "are not images of" if missing else "match several images of"
        raise DatasetFormatError(
            f"data set '{name}': {len(problem)} of the {len(wanted)} names in {list_file} {what} "
            f"{parent_json} (e.g. {', '.join(problem[:3])}); fix the list"
        )
    return {
        **coco,
        "images": [im for im in coco["images"] if im["id"] in ids],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
    }


def load_nuclei_subset(name: str, parent: str, list_file: str) -> List:
    """Load the subset ``name`` of the registered data set ``parent`` named by ``list_file``.

    The subset is written as a COCO file next to the parent's (``<name>.json``) and loaded from
    there, and that file becomes the subset's ``json_file`` metadata, so COCO AP is computed
    against exactly these images.
    """
    if not os.path.isfile(list_file):
        raise DatasetNotFoundError(
            f"data set '{name}': image list {list_file} not found; write the file names of its "
            f"images there, one a line (a subset of '{parent}'; see README.md)"
        )
    meta = MetadataCatalog.get(parent)
    if not hasattr(meta, "json_file"):
        raise DatasetNotFoundError(f"data set '{name}': its parent '{parent}' is not registered")
    if not os.path.isfile(meta.json_file):
        load_nuclei_coco(parent, meta.json_file, meta.image_root)  # its one-line error
    try:
        coco = subset_coco(name, meta.json_file, list_file)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DatasetFormatError(
            f"data set '{name}': {meta.json_file} is not a valid COCO instances file ({e}); "
            "re-run the converter that wrote it"
        ) from e
    json_file = os.path.join(os.path.dirname(meta.json_file), f"{name}.json")
    data = json.dumps(coco, separators=(",", ":")).encode("utf-8")
    old = None
    if os.path.isfile(json_file):
        with open(json_file, "rb") as f:
            old = f.read()
    if old != data:
        atomic_write_bytes(json_file, data)
    paths = {"json_file": json_file, "image_root": meta.image_root}
    own = MetadataCatalog.get(name)
    if any(getattr(own, k, v) != v for k, v in paths.items()):  # the parent moved: start afresh
        fields = {k: v for k, v in own.as_dict().items() if k not in ("name", *paths)}
        MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(**fields)
    MetadataCatalog.get(name).set(**paths)
    return load_nuclei_coco(name, json_file, meta.image_root)


def register_nuclei_subset(name: str, parent: str, list_file: str) -> None:
    """Register ``name``: the images of the registered data set ``parent`` whose file names are
    listed in ``list_file`` (one a line; with or without folder and extension), with their
    annotations. Nothing is read until the data set is loaded."""
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog:
            catalog.remove(name)
    DatasetCatalog.register(name, functools.partial(load_nuclei_subset, name, parent, list_file))
    MetadataCatalog.get(name).set(
        thing_classes=list(NUCLEUS_CLASSES),
        evaluator_type=EVALUATOR_TYPE,
        image_list=list_file,
        parent_dataset=parent,
    )


register_all_nuclei_datasets()
