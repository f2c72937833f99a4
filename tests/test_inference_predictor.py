"""The Predictor: tiled prediction without duplicate or cut nuclei, one outline per nucleus."""

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import DarkBlobModel
from detectron2.structures import Boxes, Instances
from scipy import ndimage

from dessam_d2.inference.images import predict_images
from dessam_d2.inference.outputs import output_paths
from dessam_d2.inference.predictor import Predictor


class ThresholdModel(DarkBlobModel):
    """The stand-in for DES-SAM at 64 px: one instance per dark blob of its input. It sees only
    what a tile shows, so a blob cut by the tile border comes out cut: the tiling must keep each
    nucleus from the one tile that holds it whole."""

    def __init__(self, image_size=64):
        super().__init__(image_size=image_size, dark=100)


def disc_image(h=150, w=200, centres=((20, 20), (60, 63), (100, 30), (130, 120), (75, 170))):
    img = np.full((h, w, 3), 220, np.uint8)
    truth = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    for i, (cy, cx) in enumerate(centres, start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2
        img[disc] = 40
        truth[disc] = i
    return img, truth


def test_tiled_prediction_keeps_every_nucleus_once_and_whole():
    img, truth = disc_image()
    whole = Predictor(ThresholdModel(image_size=256))(img)
    tiled = Predictor(ThresholdModel(), tile_size=64, tile_overlap=24)(img)
    assert len(whole) == len(tiled) == 5
    for mask, box in zip(tiled.pred_masks.numpy(), tiled.pred_boxes.tensor.tolist()):
        ids = np.unique(truth[mask])
        assert len(ids) == 1 and ids[0] > 0 and mask.sum() == (truth == ids[0]).sum()
        ys, xs = np.nonzero(truth == ids[0])  # the box, moved from its tile to the image
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


class OneMaskModel(ThresholdModel):
    """Every dark pixel in one instance: a nucleus in five far-apart pieces, as SAM's masks of a
    box can spill into the neighbours."""

    def forward(self, batched_inputs):
        out = super().forward(batched_inputs)
        for o in out:
            inst = o["instances"]
            merged = Instances(inst.image_size)
            merged.pred_masks = inst.pred_masks.any(dim=0, keepdim=True)
            merged.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
            merged.scores = torch.tensor([0.9])
            merged.pred_classes = torch.zeros(1, dtype=torch.int64)
            o["instances"] = merged
        return out


@pytest.mark.parametrize("clean", [False, True])
def test_clean_masks_give_one_polygon_per_nucleus(tmp_path, clean):
    img, truth = disc_image()
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, img)
    predictor = Predictor(OneMaskModel(image_size=256), clean_masks=clean)
    predict_images(predictor, [path], str(tmp_path / "out"), progress=False)
    paths = output_paths(str(tmp_path / "out"), path)
    with open(paths["geojson"]) as f:
        (feature,) = json.load(f)["features"]
    labels = cv2.imread(paths["labels"], cv2.IMREAD_UNCHANGED)
    pieces, n = ndimage.label(labels == 1)
    hit = truth[labels == 1]  # the discs under the nucleus (the model sees a resized image)
    if clean:  # the largest disc alone, the others gone
        assert feature["geometry"]["type"] == "Polygon"
        assert n == 1 and np.unique(hit[hit > 0]).size == 1
    else:
        assert feature["geometry"]["type"] == "MultiPolygon"
        assert n == len(feature["geometry"]["coordinates"]) == 5
