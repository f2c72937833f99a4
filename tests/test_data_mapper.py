"""DESSAMDatasetMapper: SAM longest-side resize, boxes only in training, any input layout."""

import logging

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.config import CfgNode, get_cfg
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image

from dessam_d2.data.mapper import DESSAMDatasetMapper
from dessam_d2.data.transforms import HEDJitterTransform, sam_model_input
from dessam_d2.errors import ConfigError


def _rgb(h, w):
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 255  # pure red: channel order is checked
    return image


def _dict(path, h, w, annotations):
    return {
        "file_name": str(path),
        "image_id": 7,
        "height": h,
        "width": w,
        "annotations": annotations,
    }


def _box(xywh, **extra):
    return {"bbox": list(xywh), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, **extra}


@pytest.fixture
def wide_image(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(_rgb(100, 200)).save(path)
    return path


def test_training_resizes_longest_side_and_scales_boxes(wide_image):
    annotations = [
        # the mapper must not even look at masks: a broken segmentation would raise if decoded
        _box([20, 10, 40, 40], segmentation="not a mask"),
        _box([0, 0, 200, 100], iscrowd=1),  # crowd regions are not prompts
    ]
    dataset_dict = _dict(wide_image, 100, 200, annotations)
    out = DESSAMDatasetMapper(True, image_size=64)(dataset_dict)
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 32, 64)
    assert out["image"][0].min() == 255 and out["image"][1:].max() == 0  # RGB, not BGR
    assert (out["height"], out["width"], out["image_id"]) == (100, 200, 7)
    assert out["sam_transform"] == "longest64"
    inst = out["instances"]
    assert inst.image_size == (32, 64)
    assert set(inst.get_fields()) == {"gt_boxes", "gt_classes"}  # never gt_masks
    scale = 64 / 200
    expected = torch.tensor([[20 * scale, 10 * scale, 60 * scale, 50 * scale]])
    torch.testing.assert_close(inst.gt_boxes.tensor, expected)
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_classes.tolist() == [0]
    assert "annotations" not in out
    assert dataset_dict["annotations"][0]["bbox"] == [20, 10, 40, 40]  # input untouched


def test_small_image_is_upscaled_and_tall_image_keeps_aspect(tmp_path):
    path = tmp_path / "tall.png"
    Image.fromarray(_rgb(20, 10)).save(path)
    out = DESSAMDatasetMapper(True, image_size=64)(
        _dict(path, 20, 10, [_box([2, 4, 4, 8], bbox_mode=BoxMode.XYWH_ABS)])
    )
    assert tuple(out["image"].shape) == (3, 64, 32)
    torch.testing.assert_close(
        out["instances"].gt_boxes.tensor, torch.tensor([[6.4, 12.8, 19.2, 38.4]])
    )


def test_boxes_are_clipped_and_degenerate_ones_dropped_with_warning(wide_image, caplog):
    annotations = [
        _box([150, 80, 100, 100]),  # partly outside: clipped to the image
        _box([300, 10, 20, 20]),  # fully outside
        _box([10, 10, 0, 30]),  # zero width
        _box([10, 10, 0.5, 30]),  # narrower than 1 px
        {"bbox": [1, 2, 101, 52], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
    ]
    with caplog.at_level(logging.WARNING, logger="dessam_d2.data.mapper"):
        out = DESSAMDatasetMapper(True, image_size=200)(_dict(wide_image, 100, 200, annotations))
    torch.testing.assert_close(
        out["instances"].gt_boxes.tensor,
        torch.tensor([[150.0, 80.0, 200.0, 100.0], [1, 2, 101, 52]]),
    )
    assert out["instances"].gt_classes.tolist() == [0, 0]
    assert f"{wide_image}: dropped 3 box(es)" in caplog.text


def test_image_without_valid_boxes_keeps_empty_instances(wide_image):
    out = DESSAMDatasetMapper(True, image_size=64)(_dict(wide_image, 100, 200, []))
    assert len(out["instances"]) == 0 and tuple(out["instances"].gt_boxes.tensor.shape) == (0, 4)


def test_test_mode_has_no_instances_nor_annotations(wide_image):
    dataset_dict = _dict(wide_image, 100, 200, [_box([20, 10, 40, 40])])
    out = DESSAMDatasetMapper(False, image_size=64, random_flip="both")(dataset_dict)
    assert "instances" not in out and "annotations" not in out
    assert out["sam_transform"] == "longest64"  # no flips at test time
    assert len(dataset_dict["annotations"]) == 1


def test_horizontal_flip_moves_boxes_and_names_the_transform(wide_image):
    mapper = DESSAMDatasetMapper(True, image_size=64, random_flip="horizontal")
    seen = {}
    np.random.seed(0)
    for _ in range(20):
        out = mapper(_dict(wide_image, 100, 200, [_box([20, 10, 40, 40])]))
        seen[out["sam_transform"]] = out["instances"].gt_boxes.tensor[0].tolist()
    assert set(seen) == {"longest64", "longest64+hflip"}
    x0, y0, x1, y1 = seen["longest64"]
    np.testing.assert_allclose(seen["longest64+hflip"], [64 - x1, y0, 64 - x0, y1], rtol=1e-6)


@pytest.mark.parametrize("kind", ["gray", "rgba", "gray16"])
def test_grayscale_rgba_16bit_become_rgb_uint8(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "gray":
        cv2.imwrite(str(path), np.full((8, 16), 90, np.uint8))
        expected = [90, 90, 90]
    elif kind == "rgba":
        Image.fromarray(np.dstack([_rgb(8, 16), np.zeros((8, 16), np.uint8)])).save(path)
        expected = [255, 0, 0]
    else:
        gray16 = np.full((8, 16), 4000, np.uint16)
        gray16[:, 8:] = 1000
        cv2.imwrite(str(path), gray16)
        expected = [255, 255, 255]  # left half is the maximum
    out = DESSAMDatasetMapper(False, image_size=16)(_dict(path, 8, 16, []))
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 8, 16)
    assert out["image"][:, 0, 0].tolist() == expected


def test_size_mismatch_with_the_dataset_dict(wide_image):
    with pytest.raises(SizeMismatchError, match="wide.png"):
        DESSAMDatasetMapper(False, image_size=64)(_dict(wide_image, 50, 50, []))


def test_from_config_and_bad_arguments():
    cfg = get_cfg()
    cfg.MODEL.SAM = CfgNode({"IMAGE_SIZE": 256})
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.RANDOM_FLIP = "vertical"
    mapper = DESSAMDatasetMapper(cfg, is_train=True)
    assert (mapper.is_train, mapper.image_size, mapper.image_format, mapper.random_flip) == (
        True,
        256,
        "RGB",
        "vertical",
    )
    assert DESSAMDatasetMapper(cfg, False).augmentations.augs == []
    with pytest.raises(ValueError, match="random_flip must be one of"):
        DESSAMDatasetMapper(True, random_flip="diagonal")
    with pytest.raises(ValueError, match="image_format must be one of"):
        DESSAMDatasetMapper(True, image_format="YUV-BT.601")


def test_bgr_format_reverses_the_channels_in_every_path(wide_image):
    """INPUT.FORMAT BGR: the mapper (training, evaluation) and prediction (sam_model_input, via
    Predictor) feed the model the same reversed channels."""
    mapped = DESSAMDatasetMapper(False, image_size=64, image_format="BGR")(
        _dict(wide_image, 100, 200, [])
    )
    assert mapped["image"][2].min() == 255 and mapped["image"][:2].max() == 0  # red last
    direct, _ = sam_model_input(_rgb(100, 200), 64, "BGR")
    assert torch.equal(direct["image"], mapped["image"])
    assert direct["sam_transform"] == mapped["sam_transform"] == "longest64"
    rgb, _ = sam_model_input(_rgb(100, 200), 64)
    assert torch.equal(rgb["image"], direct["image"].flip(0))


# ---------------------------------------------------------------- stain augmentation
# Beyond the transform's own tests (test_data_transforms.py): training with it never uses the
# embedding cache (a ConfigError, training only), the jitter's draws come from NumPy's global
# generator (Detectron2's per-worker seeding), BGR models see the same jitter with the channels
# reversed, and a pure haematoxylin colour stays haematoxylin.

STAIN_ON = {"INPUT.STAIN_AUGMENT": True, "INPUT.STAIN_AUGMENT_SIGMA": 0.3}


def test_training_with_the_embedding_cache_is_a_config_error(tmp_path):
    cache = {"MODEL.DESSAM.EMBEDDING_CACHE_DIR": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="EMBEDDING_CACHE_DIR"):
        DESSAMDatasetMapper(tiny_cfg(**STAIN_ON, **cache), is_train=True)
    # evaluation is never jittered; without the jitter or the cache, or with a trained encoder
    # (the model ignores the cache then), training is fine
    DESSAMDatasetMapper(tiny_cfg(**STAIN_ON, **cache), is_train=False)
    DESSAMDatasetMapper(tiny_cfg(**cache), is_train=True)
    DESSAMDatasetMapper(tiny_cfg(**STAIN_ON), is_train=True)
    DESSAMDatasetMapper(tiny_cfg(**STAIN_ON, **cache, **{"MODEL.SAM.FREEZE_ENCODER": False}), True)


def test_the_draws_follow_numpys_seed_and_bgr_reverses_the_jittered_channels(stained_record):
    def mapped(seed, **overrides):
        np.random.seed(seed)
        return DESSAMDatasetMapper(tiny_cfg(**STAIN_ON, **overrides), is_train=True)(
            dict(stained_record)
        )

    first, again, other = mapped(5), mapped(5), mapped(6)
    assert first["image"].equal(again["image"]) and not first["image"].equal(other["image"])
    assert first["sam_transform"].endswith("+hed")
    bgr = mapped(5, **{"INPUT.FORMAT": "BGR"})
    assert bgr["image"].equal(first["image"].flip(0))
    assert bgr["instances"].gt_boxes.tensor.equal(first["instances"].gt_boxes.tensor)


def test_pure_haematoxylin_stays_haematoxylin():
    from skimage.color import hed2rgb, rgb2hed

    hed = np.zeros((8, 8, 3))
    hed[..., 0] = np.linspace(0.02, 0.1, 64).reshape(8, 8)  # haematoxylin only
    image = np.rint(hed2rgb(hed) * 255).astype(np.uint8)
    jitter = HEDJitterTransform(np.array([1.3, 0.8, 1.2]), np.array([0.05, 0.0, 0.0]))
    out = jitter.apply_image(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image.astype(int)).max() > 5  # it did change
    after = rgb2hed(out)
    assert after[..., 0].mean() > 1.2 * rgb2hed(image)[..., 0].mean()
    # E and D stay small beside H: the change stayed in the haematoxylin channel
    assert np.abs(after[..., 1:]).max() < 0.2 * after[..., 0].max()
