"""Shared fixtures: tiny DES-SAM shapes (encoder depth 2, width 64, 256 px), seconds a step.

Tests name the repository's files (configs/, tools/, weights/) relative to its root, as the
README's commands do: the working directory is set to it, so pytest runs from any folder.
"""

import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, BoxMode, Instances
from scipy import ndimage

from dessam_d2 import add_dessam_config
from dessam_d2.data.synthetic.cytology import synthetic_model_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
BASE_CONFIG = os.path.join(ROOT, "configs", "Base-DESSAM.yaml")
DEMO = os.path.join(ROOT, "configs", "dessam_demo.yaml")
# A random tiny SAM whatever the demo config loads: tool tests need shapes, not knowledge.
SMALL = [
    "MODEL.SAM.CHECKPOINT", "",
    "MODEL.SAM.IMAGE_SIZE", "128",
    "TEST.DETECTIONS_PER_IMAGE", "2",
]  # fmt: skip


def tiny_cfg(**overrides):
    cfg = get_cfg()
    add_dessam_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(
        [
            "MODEL.SAM.VARIANT", "custom",
            "MODEL.SAM.IMAGE_SIZE", 256,
            "MODEL.SAM.ENCODER_EMBED_DIM", 64,
            "MODEL.SAM.ENCODER_DEPTH", 2,
            "MODEL.SAM.ENCODER_NUM_HEADS", 2,
            "MODEL.SAM.ENCODER_GLOBAL_ATTN_INDEXES", [1],
            "MODEL.SAM.ENCODER_WINDOW_SIZE", 4,
            "MODEL.SAM.DECODER_MLP_DIM", 256,
            "MODEL.FPN.OUT_CHANNELS", 64,
            "MODEL.ROI_BOX_HEAD.CONV_DIM", 64,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 128,
            "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64]],
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
            # the same numbers on every CPU ("auto" is bfloat16 where the CPU has it natively)
            "MODEL.DESSAM.INFERENCE_DTYPE", "float32",
        ]  # fmt: skip
    )
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def make_instances(boxes, image_size):
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
    return inst


def synthetic_input(seed=0, size=(256, 200), boxes=((20, 30, 60, 70), (100, 120, 140, 150))):
    """An image with dark disc nuclei inside the given boxes, as the mapper would hand it over."""
    return synthetic_model_input(size, boxes=[list(b) for b in boxes], seed=seed)


class DarkBlobModel(torch.nn.Module):
    """A stand-in for DES-SAM: one instance per 4-connected dark blob of what it is shown. It
    sees one tile only, so a blob cut by the tile's border comes out cut; ``calls`` counts the
    tiles it was given, and ``fail_at`` raises on that call (a killed run); a pixel is
    nucleus when its grey level is below ``dark``."""

    def __init__(self, image_size=128, fail_at=None, dark=120):
        super().__init__()
        self.image_size, self.fail_at, self.calls, self.dark = image_size, fail_at, 0, dark

    def forward(self, batched_inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        out = []
        for x in batched_inputs:
            h, w = x["height"], x["width"]
            img = x["image"].permute(1, 2, 0).numpy()
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
            labels, n = ndimage.label(img.mean(axis=2) < self.dark)
            inst = Instances((h, w))
            inst.pred_masks = torch.as_tensor(
                np.stack([labels == i for i in range(1, n + 1)]) if n else np.zeros((0, h, w)),
                dtype=torch.bool,
            )
            boxes = [
                [s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)
            ]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.linspace(0.9, 0.6, n) if n else torch.zeros(0)
            inst.pred_classes = torch.zeros(n, dtype=torch.int64)
            out.append({"instances": inst})
        return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A small pyramidal TIFF slide of synthetic cytology (768 x 1024, 0.25 µm/px)."""
    from dessam_d2.data.synthetic.slide import write_synthetic_slide

    path = str(tmp_path_factory.mktemp("slide") / "cyto.tif")
    write_synthetic_slide(path, (768, 1024), seed=5, mpp=0.25)
    return path


@pytest.fixture
def cfg():
    return tiny_cfg()


@pytest.fixture
def one_thread():
    # Two OpenMP threads on two shared cores crawl when other processes take one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The longest test (a 312-step training and a prediction, minutes): run first, so that with
# `-n 2` the other worker fills the time with the rest instead of one worker running it alone
# at the end.
LONGEST_FIRST = ("test_e2e_user_dataset.py",)


def pytest_collection_modifyitems(config, items):
    # tests/test_e2e_*.py run the tools or training end to end: `pytest -m "not e2e"` skips them
    for item in items:
        if os.path.basename(str(item.fspath)).startswith("test_e2e_"):
            item.add_marker(pytest.mark.e2e)
    items.sort(key=lambda item: os.path.basename(str(item.fspath)) not in LONGEST_FIRST)


@pytest.fixture
def stained_record(tmp_path):
    """A 64 px H&E-like image (a purple nucleus on pink) with one box whose mask, if read,
    fails the test."""
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), (225, 200, 230), np.uint8)  # pink background
    image[10:30, 10:30] = (90, 60, 150)  # a purple nucleus
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, image[:, :, ::-1])

    class NoMask(dict):
        def __getitem__(self, key):
            assert key != "segmentation", "a mask was read"
            return super().__getitem__(key)

    ann = NoMask(bbox=[10, 10, 20, 20], bbox_mode=BoxMode.XYWH_ABS, category_id=0, iscrowd=0)
    return {"file_name": path, "height": 64, "width": 64, "image_id": 1, "annotations": [ann]}
