"""The output files (the COCO results against the label images and CSVs) and the summary."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Boxes, Instances
from test_inference_predictor import disc_image

from dessam_d2.inference.images import predict_images
from dessam_d2.inference.outputs import NUCLEI, RunSummary
from dessam_d2.inference.predictor import Predictor


class FixedModel(torch.nn.Module):
    """Returns given masks and scores for an image of a given size (overlaps included)."""

    def __init__(self, by_size):
        super().__init__()
        self.image_size = 256
        self.by_size = by_size

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            masks, scores = self.by_size[(x["height"], x["width"])]
            inst = Instances((x["height"], x["width"]))
            inst.pred_masks = torch.as_tensor(np.stack(masks))
            boxes = [
                [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                for ys, xs in map(np.nonzero, masks)
            ]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.scores = torch.tensor(scores)
            inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
            out.append({"instances": inst})
        return out


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_coco_results_are_the_visible_masks_with_their_scores_and_boxes(tmp_path):
    """predictions_coco.json, decoded: each RLE is its nucleus' mask minus what higher-scoring
    nuclei cover (they own overlapping pixels), with its own score and XYWH box, under the
    image id that predictions_images.json gives the image's file."""
    a = _rect(60, 80, 10, 30, 10, 40)  # low score, partly under b
    b = _rect(60, 80, 20, 40, 30, 60)
    c = disc_image(60, 80, centres=((45, 15),))[1] > 0
    d = _rect(50, 70, 5, 25, 40, 66)
    model = FixedModel({(60, 80): ([a, b, c], [0.6, 0.9, 0.8]), (50, 70): ([d], [0.7])})
    expected = {
        "first.png": {0.6: a & ~b, 0.9: b, 0.8: c},
        "second.png": {0.7: d},
    }
    paths = []
    for name, (h, w) in (("first.png", (60, 80)), ("second.png", (50, 70))):
        cv2.imwrite(str(tmp_path / name), np.full((h, w, 3), 200, np.uint8))
        paths.append(str(tmp_path / name))
    out = tmp_path / "out"
    predict_images(Predictor(model), paths[::-1], str(out), progress=False)  # ids by given order

    images = json.load(open(out / "predictions_images.json"))
    file_of = {i["id"]: i["file_name"].split("/")[-1] for i in images}
    assert file_of == {1: "second.png", 2: "first.png"}
    results = json.load(open(out / "predictions_coco.json"))
    assert len(results) == 4
    seen = set()
    for r in results:
        name = file_of[r["image_id"]]
        truth = expected[name][round(r["score"], 4)]
        decoded = mask_util.decode(r["segmentation"]).astype(bool)
        assert decoded.shape == truth.shape and np.array_equal(decoded, truth), (name, r["score"])
        ys, xs = np.nonzero(truth)
        box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert r["bbox"] == box and r["category_id"] == 1
        # and the label image says the same: the pixels of one id, that id's row in the CSV
        labels = cv2.imread(str(out / name.replace(".png", "_labels.png")), cv2.IMREAD_UNCHANGED)
        ids = np.unique(labels[decoded])
        assert len(ids) == 1 and np.array_equal(labels == ids[0], decoded)
        seen.add((name, r["score"]))
    assert len(seen) == 4


def test_one_summary_for_images_slides_and_masks_and_for_several_processes():
    counts = ["tiles predicted", "tiles skipped (no tissue)", NUCLEI]
    a = RunSummary("slides", done=1, counts=dict(zip(counts, (3, 2, 5))))
    b = RunSummary("slides", failed={"x.svs": "broken"}, counts=dict(zip(counts, (4, 0, 0))))
    b.seconds = 2.0
    both = RunSummary.of_all([a, b])
    assert both.done == 1 and both.counts == dict(zip(counts, (7, 2, 5)))
    assert both.failed == {"x.svs": "broken"} and both.seconds == 2.0
    lines = both.table().splitlines()
    assert [line.rsplit(None, 1)[0] for line in lines[1:-1]] == [
        "slides predicted",
        "slides skipped (already done)",
        "slides failed",
        *counts,
        "seconds",
    ]
    images = RunSummary.of_all(
        [RunSummary(failed={"b": "2"}), RunSummary(failed={"a": "1"})], order=["a", "b"]
    )
    assert list(images.failed) == ["a", "b"] and "tiles" not in images.table()
    masks = RunSummary(done=2, skipped=1, done_as="segmented", skipped_as="resumed")
    masks.add("masks written", 3)
    masks.add("masks written", 4)
    assert masks.counts == {"masks written": 7}
    assert masks.table().splitlines()[1:3] == ["images segmented  2", "images resumed    1"]
