"""INPUT.STAIN_AUGMENT beyond the transform's own tests (test_data_transforms.py): training with
it never uses the embedding cache (a ConfigError, training only), the jitter's draws come from
NumPy's global generator (Detectron2's per-worker seeding), BGR models see the same jitter with
the channels reversed, and a pure haematoxylin colour stays haematoxylin."""

import numpy as np
import pytest
from conftest import tiny_cfg
from detectron2.structures import BoxMode

from dessam_d2.data.mapper import DESSAMDatasetMapper
from dessam_d2.data.transforms import HEDJitterTransform
from dessam_d2.errors import ConfigError

ON = {"INPUT.STAIN_AUGMENT": True, "INPUT.STAIN_AUGMENT_SIGMA": 0.3}


@pytest.fixture
def record(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    image = np.full((48, 48, 3), (225, 200, 230), np.uint8)  # pink background
    image[8:24, 8:24] = (90, 60, 150)  # a purple nucleus
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, image[:, :, ::-1])
    ann = {"bbox": [8, 8, 16, 16], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0}
    return {"file_name": path, "height": 48, "width": 48, "image_id": 1, "annotations": [ann]}


def test_training_with_the_embedding_cache_is_a_config_error(tmp_path):
    cache = {"MODEL.DESSAM.EMBEDDING_CACHE_DIR": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="EMBEDDING_CACHE_DIR"):
        DESSAMDatasetMapper(tiny_cfg(**ON, **cache), is_train=True)
    # evaluation is never jittered; without the jitter or the cache, or with a trained encoder
    # (the model ignores the cache then), training is fine
    DESSAMDatasetMapper(tiny_cfg(**ON, **cache), is_train=False)
    DESSAMDatasetMapper(tiny_cfg(**cache), is_train=True)
    DESSAMDatasetMapper(tiny_cfg(**ON), is_train=True)
    DESSAMDatasetMapper(tiny_cfg(**ON, **cache, **{"MODEL.SAM.FREEZE_ENCODER": False}), True)


def test_the_draws_follow_numpys_seed_and_bgr_reverses_the_jittered_channels(record):
    def mapped(seed, **overrides):
        np.random.seed(seed)
        return DESSAMDatasetMapper(tiny_cfg(**ON, **overrides), is_train=True)(dict(record))

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
