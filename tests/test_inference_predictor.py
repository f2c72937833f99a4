"""Predicting on your own images: tiling without duplicates, features, every output file."""

import csv
import json
import math

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Boxes, Instances
from scipy import ndimage

from dessam_d2.inference.predictor import (
    CSV_FIELDS,
    Predictor,
    collect_images,
    nucleus_features,
    output_paths,
    predict_images,
    tile_core,
    tile_starts,
)


class ThresholdModel(torch.nn.Module):
    """A stand-in for DES-SAM with the same interface: one instance per dark blob of its input.

    It sees only what a tile shows, so a blob cut by the tile border comes out cut: the tiling
    must keep each nucleus from the one tile that holds it whole.
    """

    def __init__(self, image_size=64):
        super().__init__()
        self.image_size = image_size

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            h, w = x["height"], x["width"]
            img = x["image"].permute(1, 2, 0).numpy()
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
            labels, n = ndimage.label(img[..., 0] < 100)
            inst = Instances((h, w))
            masks = np.stack([labels == i for i in range(1, n + 1)]) if n else np.zeros((0, h, w))
            inst.pred_masks = torch.as_tensor(masks, dtype=torch.bool)
            boxes = [
                [s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)
            ]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.linspace(0.9, 0.6, n) if n else torch.zeros(0)
            inst.pred_classes = torch.zeros(n, dtype=torch.int64)
            out.append({"instances": inst})
        return out


def disc_image(h=150, w=200, centres=((20, 20), (60, 63), (100, 30), (130, 120), (75, 170))):
    img = np.full((h, w, 3), 220, np.uint8)
    truth = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    for i, (cy, cx) in enumerate(centres, start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2
        img[disc] = 40
        truth[disc] = i
    return img, truth


def test_tiles_cover_the_image_and_their_cores_partition_it():
    for length, tile, overlap in [(200, 64, 24), (64, 64, 10), (1000, 256, 64), (257, 256, 32)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        cores = [tile_core(starts, i, tile, length) for i in range(len(starts))]
        assert cores[0][0] == 0 and cores[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))


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


def test_features_of_a_disc_and_an_ellipse():
    labels = np.zeros((80, 80), np.int32)
    yy, xx = np.mgrid[:80, :80]
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2] = 1
    labels[((yy - 60) / 5.0) ** 2 + ((xx - 50) / 20.0) ** 2 <= 1] = 2
    image = np.full((80, 80, 3), 200, np.uint8)
    image[labels == 1] = 20
    rows = nucleus_features(image, labels, {1: 0.9, 2: 0.8})
    disc, ellipse = rows
    assert disc["area"] == (labels == 1).sum() and disc["score"] == 0.9
    assert disc["circularity"] == pytest.approx(1.0, abs=0.12)
    assert disc["eccentricity"] == pytest.approx(0.0, abs=0.05)
    assert ellipse["eccentricity"] == pytest.approx(math.sqrt(1 - (5 / 20) ** 2), abs=0.02)
    assert (disc["x0"], disc["y0"], disc["x1"], disc["y1"]) == (5, 5, 36, 36)
    assert disc["mean_intensity"] == pytest.approx(20, abs=0.5)
    # Background grey 200, nucleus 20: OD = log10(200/20) = 1 per pixel.
    assert disc["brightfield_integrated_od"] == pytest.approx(disc["area"], rel=1e-3)
    assert ellipse["brightfield_integrated_od"] == pytest.approx(0.0, abs=1e-6)
    assert disc["integrated_intensity"] == 20 * disc["area"]
    assert ellipse["integrated_intensity"] == 200 * ellipse["area"]


def test_fluorescence_nuclei_have_an_integrated_intensity():
    """Bright nuclei on a dark background: the sum of grey values measures them; the brightfield
    OD is negative (log10(10 / 160) = -1.204 per pixel), as the README warns."""
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 5:25] = 1  # 200 px
    image = np.full((40, 40, 3), 10, np.uint8)
    image[10:15, 5:25] = 160  # half the nucleus bright, half as dark as the background
    (row,) = nucleus_features(image, labels, {1: 0.5})
    assert row["integrated_intensity"] == 100 * 160 + 100 * 10
    assert row["mean_intensity"] == 85.0
    assert row["brightfield_integrated_od"] == pytest.approx(100 * math.log10(10 / 160), abs=1e-3)
    assert list(row) == CSV_FIELDS


def test_every_output_file_and_rerun_skips_finished_images(tmp_path):
    img, truth = disc_image()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(inputs / name), img[..., ::-1])
    (inputs / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    paths = collect_images([str(inputs)])
    assert [p.split("/")[-1] for p in paths] == ["a.png", "b.png", "broken.png"]
    summary = predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(out), progress=False)
    assert (summary.done, summary.skipped, summary.nuclei) == (2, 0, 10)
    assert list(summary.failed) == [paths[2]] and "broken.png" in summary.failed[paths[2]]

    files = output_paths(str(out), paths[0])
    labels = cv2.imread(files["labels"], cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == truth.shape
    assert len(np.unique(labels)) == 6 and ((labels > 0) == (truth > 0)).all()
    rows = list(csv.DictReader(open(files["csv"])))
    assert [int(r["area"]) for r in rows] == [(labels == int(r["id"])).sum() for r in rows]
    geo = json.load(open(files["geojson"]))
    assert len(geo["features"]) == 5
    assert geo["features"][0]["properties"]["classification"]["name"] == "Nucleus"
    assert cv2.imread(files["overlay"]).shape == (150, 200, 3)
    coco = json.load(open(out / "predictions_coco.json"))
    images = json.load(open(out / "predictions_images.json"))
    assert len(coco) == 10 and [i["id"] for i in images] == [1, 2]
    assert {r["image_id"] for r in coco} == {1, 2} and coco[0]["category_id"] == 1

    again = predict_images(Predictor(ThresholdModel(), 64, 24), paths[:2], str(out), progress=False)
    assert (again.done, again.skipped) == (0, 2)
    redo = predict_images(
        Predictor(ThresholdModel(), 64, 24), paths[:2], str(out), overwrite=True, progress=False
    )
    assert (redo.done, redo.skipped) == (2, 0)
    assert not list(out.glob("*.tmp*"))


def test_no_images_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images found"):
        collect_images([str(tmp_path / "*.png")])


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
