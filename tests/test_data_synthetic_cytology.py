"""Synthetic cytology: deterministic files, exact masks, boxes = mask extents, dark nuclei."""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest

from dessam_d2.data.image_io import read_image_rgb
from dessam_d2.data.synthetic.cytology import (
    MIN_VISIBLE_AREA,
    generate_synthetic_dataset,
    make_synthetic_cytology,
    render_synthetic_image,
)

SMALL = dict(image_size=(96, 128), nuclei_per_image=(4, 10), nucleus_radius=(4.0, 10.0))


def _files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    json_file = generate_synthetic_dataset(str(out), 4, seed=3, **SMALL)
    with open(json_file) as f:
        return out, json.load(f)


def test_same_seed_gives_byte_identical_files(tmp_path, dataset):
    out, _ = dataset
    json_file = generate_synthetic_dataset(str(tmp_path), 4, seed=3, **SMALL)
    assert json_file == str(tmp_path / "annotations.json")
    first, second = _files(out), _files(tmp_path)
    assert sorted(first) == ["annotations.json"] + [f"images/{i:05d}.png" for i in range(4)]
    assert first == second


def test_different_seed_gives_different_data():
    a, masks_a = render_synthetic_image(np.random.default_rng(1), **SMALL)
    b, masks_b = render_synthetic_image(np.random.default_rng(2), **SMALL)
    a2, masks_a2 = render_synthetic_image(np.random.default_rng(1), **SMALL)
    np.testing.assert_array_equal(a, a2)
    assert len(masks_a) == len(masks_a2)
    assert all(np.array_equal(m, n) for m, n in zip(masks_a, masks_a2))
    assert np.abs(a.astype(int) - b).mean() > 1.0


def test_image_i_does_not_depend_on_num_images(tmp_path):
    generate_synthetic_dataset(str(tmp_path / "two"), 2, seed=5, **SMALL)
    generate_synthetic_dataset(str(tmp_path / "three"), 3, seed=5, **SMALL)
    for name in ("00000.png", "00001.png"):
        assert (tmp_path / "two/images" / name).read_bytes() == (
            tmp_path / "three/images" / name
        ).read_bytes()


def test_coco_fields_masks_disjoint_and_boxes_are_mask_extents(dataset):
    out, coco = dataset
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 4]
    assert coco["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert 1 <= len(anns) <= 10
        cover = np.zeros((96, 128), int)
        for a in anns:
            assert a["iscrowd"] == 0 and a["category_id"] == 1
            mask = mask_util.decode(a["segmentation"]).astype(bool)
            assert mask.shape == (96, 128) and mask.sum() == a["area"] >= MIN_VISIBLE_AREA
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            expected = [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
            assert a["bbox"] == [float(v) for v in expected]
            cover += mask
        assert cover.max() == 1  # later nuclei took the overlapping pixels


def test_nuclei_are_clearly_darker_than_everything_else(dataset):
    out, coco = dataset
    for image in coco["images"]:
        gray = read_image_rgb(out / "images" / image["file_name"]).mean(axis=2)
        nuclei = np.zeros(gray.shape, bool)
        for a in coco["annotations"]:
            if a["image_id"] == image["id"]:
                nuclei |= mask_util.decode(a["segmentation"]).astype(bool)
        assert gray[~nuclei].mean() - gray[nuclei].mean() > 60


def test_some_nuclei_touch_or_overlap(dataset):
    """Not trivial: across the images at least one pair of nuclei is 8-adjacent or overlapping."""
    _, coco = dataset
    touching = 0
    for image in coco["images"]:
        masks = [
            mask_util.decode(a["segmentation"]).astype(bool)
            for a in coco["annotations"]
            if a["image_id"] == image["id"]
        ]
        for i, m in enumerate(masks):
            grown = np.zeros_like(m)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    grown |= np.roll(np.roll(m, dy, 0), dx, 1)
            touching += sum(bool((grown & n).any()) for n in masks[i + 1 :])
    assert touching >= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_images=0), "num_images must be >= 1"),
        (dict(nuclei_per_image=(5, 2)), "nuclei_per_image"),
        (dict(nucleus_radius=(1.0, 4.0)), "nucleus_radius"),
        (dict(image_size=(40, 40), nucleus_radius=(6.0, 16.0)), "too small"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = dict(output_dir=str(tmp_path), num_images=1, **SMALL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(**args)
    assert not (tmp_path / "annotations.json").exists()


def test_make_splits_uses_different_seeds(tmp_path):
    paths = make_synthetic_cytology(str(tmp_path), num_train=1, num_test=1, seed=0, **SMALL)
    assert paths == {
        "train": str(tmp_path / "train/annotations.json"),
        "test": str(tmp_path / "test/annotations.json"),
        "test_shifted": str(tmp_path / "test_shifted/annotations.json"),
    }
    pngs = [(tmp_path / s / "images/00000.png").read_bytes() for s in paths]
    assert len(set(pngs)) == 3


def test_the_shifted_style_changes_stain_and_nucleus_size():
    rng = lambda: np.random.default_rng(4)  # noqa: E731
    pap, masks = render_synthetic_image(rng(), (128, 128), (4, 4), (6.0, 8.0))
    shifted, big = render_synthetic_image(rng(), (128, 128), (4, 4), (9.0, 12.0), "shifted")
    inside = np.any(masks, axis=0)
    inside_shifted = np.any(big, axis=0)
    # Papanicolaou nuclei are blue-purple (B > R); the shifted style's are brown (R > B).
    assert pap[inside, 2].mean() > pap[inside, 0].mean()
    assert shifted[inside_shifted, 0].mean() > shifted[inside_shifted, 2].mean()
    assert np.mean([m.sum() for m in big]) > 1.5 * np.mean([m.sum() for m in masks])
    with pytest.raises(ValueError, match="unknown stain style"):
        render_synthetic_image(rng(), (64, 64), (1, 1), (4.0, 5.0), "he")
