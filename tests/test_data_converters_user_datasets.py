"""Your own boxes: COCO as CVAT and Label Studio export it, QuPath GeoJSON, --dataset errors.

The fixtures are written field for field as the tools write them (see each writer's docstring;
README "Train on your own boxes" says what could not be confirmed).
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from dessam_d2.data.converters.user_datasets import parse_dataset_spec, register_user_datasets
from dessam_d2.data.synthetic.cytology import render_synthetic_image
from dessam_d2.errors import DatasetFormatError, DatasetNotFoundError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(root, names, size=(128, 128)):
    """Synthetic cytology images; returns {name: [x, y, w, h] boxes of their nuclei}."""
    boxes = {}
    for i, name in enumerate(names):
        image, masks = render_synthetic_image(np.random.default_rng(i), size, (4, 6))
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, image[..., ::-1])
        boxes[name] = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes[name].append(
                [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            )
    return boxes


def cvat_coco(boxes, size=(128, 128)):
    """CVAT "COCO 1.0" (Datumaro): licenses/info blocks, ids from 1, supercategory "", images
    with license/flickr_url/coco_url/date_captured, boxes with empty segmentation and the
    occluded/rotation attributes, float bbox."""
    coco = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {
            "contributor": "",
            "date_created": "",
            "description": "",
            "url": "",
            "version": "",
            "year": "",
        },
        "categories": [{"id": 1, "name": "Nucleus", "supercategory": ""}],
        "images": [],
        "annotations": [],
    }
    for image_id, (name, image_boxes) in enumerate(boxes.items(), start=1):
        coco["images"].append(
            {
                "id": image_id,
                "width": size[1],
                "height": size[0],
                "file_name": name,
                "license": 0,
                "flickr_url": "",
                "coco_url": "",
                "date_captured": 0,
            }
        )
        for x, y, w, h in image_boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": [],
                    "area": float(w * h),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "iscrowd": 0,
                    "attributes": {"occluded": False, "rotation": 0.0},
                }
            )
    return coco


def label_studio_coco(boxes, size=(128, 128)):
    """Label Studio "COCO": ids from 0, categories without supercategory (sorted label names),
    file_name "images/<name>", int bbox, "ignore": 0, an info block."""
    coco = {
        "images": [],
        "categories": [{"id": 0, "name": "Lymphocyte"}, {"id": 1, "name": "Tumour cell"}],
        "annotations": [],
        "info": {
            "year": 2026,
            "version": "1.0",
            "description": "",
            "contributor": "Label Studio",
            "url": "",
            "date_created": "2026-11-27 10:00:00.000000",
        },
    }
    for image_id, (name, image_boxes) in enumerate(boxes.items()):
        coco["images"].append(
            {"width": size[1], "height": size[0], "id": image_id, "file_name": name}
        )
        for k, (x, y, w, h) in enumerate(image_boxes):
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": image_id,
                    "category_id": k % 2,
                    "segmentation": [],
                    "bbox": [x, y, w, h],
                    "ignore": 0,
                    "iscrowd": 0,
                    "area": w * h,
                }
            )
    return coco


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    cvat_boxes = write_images(str(root / "cvat"), ["slide_a/field 1.png", "slide_b/field_2.png"])
    ls_boxes = write_images(str(root / "ls"), ["images/3fa2c1d0-field_3.png"])
    (root / "cvat.json").write_text(json.dumps(cvat_coco(cvat_boxes)))
    (root / "ls.json").write_text(json.dumps(label_studio_coco(ls_boxes), indent=2))
    return root, cvat_boxes, ls_boxes


def test_cvat_and_label_studio_exports_load_as_single_class_boxes(exports):
    root, cvat_boxes, ls_boxes = exports
    registered = register_user_datasets(
        [f"own_cvat={root}/cvat.json:{root}/cvat", f"own_ls={root}/ls.json:{root}/ls"]
    )
    assert registered == {"own_cvat": False, "own_ls": False}  # boxes only, no outlines
    for name, boxes in (("own_cvat", cvat_boxes), ("own_ls", ls_boxes)):
        records = DatasetCatalog.get(name)
        assert [os.path.relpath(r["file_name"], f"{root}/{name[4:]}") for r in records] == list(
            boxes
        )
        for record, image_boxes in zip(records, boxes.values()):
            assert [a["bbox"] for a in record["annotations"]] == image_boxes
            assert {a["category_id"] for a in record["annotations"]} == {0}
            assert all("segmentation" not in a for a in record["annotations"])


def test_dataset_spec_and_its_one_line_errors(exports, tmp_path):
    root, _, _ = exports
    assert parse_dataset_spec("a=x/b.json:imgs") == ("a", "x/b.json", "imgs")
    assert parse_dataset_spec("a=x/b.json") == ("a", "x/b.json", "x")
    with pytest.raises(ValueError, match="NAME=JSON"):
        parse_dataset_spec("boxes.json")
    with pytest.raises(DatasetNotFoundError, match="nope.json not found"):
        register_user_datasets([f"x={tmp_path}/nope.json"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DatasetFormatError, match="list.json is not a COCO instances file"):
        register_user_datasets([f"x={tmp_path}/list.json"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DatasetFormatError, match="broken.json is not JSON"):
        register_user_datasets([f"x={tmp_path}/broken.json"])
    with pytest.raises(DatasetNotFoundError, match=r"2 of 2 images .* \(first: slide_a/field 1"):
        register_user_datasets([f"x={root}/cvat.json:{root}"])  # wrong image root


@pytest.mark.e2e
def test_train_net_trains_on_exported_files(exports, tmp_path):
    root, _, _ = exports
    tiny = [
        "MODEL.SAM.CHECKPOINT",
        "",
        "MODEL.SAM.IMAGE_SIZE",
        "128",
        "SOLVER.EPOCHS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "1",
    ]
    tiny += ["SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "2"]
    cmd = [sys.executable, "tools/train_net.py", "--config-file", "configs/dessam_demo.yaml"]
    cmd += [
        f"--dataset=cvat={root}/cvat.json:{root}/cvat",
        f"--dataset=ls={root}/ls.json:{root}/ls",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "train"
    proc = subprocess.run(
        cmd
        + ["DATASETS.TRAIN", '("cvat", "ls")', "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
        + tiny,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    assert len(open(out / "losses.jsonl").readlines()) == 2
