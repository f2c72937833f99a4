"""Files the napari plugin's tests share: a synthetic cytology field with its nuclei, and a
DES-SAM checkpoint of the demo's shapes (the pretrained tiny SAM, an untrained detector) with a
config whose box threshold keeps its boxes, so that prediction has nuclei to show."""

import os

import numpy as np
import torch
from conftest import DEMO

from dessam_d2.data.synthetic.cytology import render_synthetic_image

# the demo config with a threshold an untrained detector passes, and a few detections an image
LOW_THRESHOLD = """_BASE_: "{demo}"
MODEL:
  ROI_HEADS:
    SCORE_THRESH_TEST: 0.0
TEST:
  SCORE_THRESH_AUTO: False
  DETECTIONS_PER_IMAGE: 12
"""


def field(seed: int = 3):
    """(H x W x 3 RGB image, N x 4 XYXY true boxes, N x H x W true masks)."""
    image, masks = render_synthetic_image(np.random.default_rng(seed), (256, 256), (6, 9))
    masks = np.stack(masks)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return image, np.array(boxes, dtype=np.float64), masks


def write_checkpoint(folder: str):
    """(config path, weights path) of an untrained detector on the demo's tiny SAM."""
    from dessam_d2.config import load_config
    from dessam_d2.modeling.checkpointer import DESSAMCheckpointer, load_model

    os.makedirs(folder, exist_ok=True)
    config = os.path.join(folder, "config.yaml")
    with open(config, "w") as f:
        f.write(LOW_THRESHOLD.format(demo=DEMO))
    torch.manual_seed(0)
    model = load_model(load_config(config), "")
    DESSAMCheckpointer(model, save_dir=folder).save("model_final")
    return config, os.path.join(folder, "model_final.pth")
