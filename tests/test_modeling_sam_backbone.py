"""SAM's encoder as a Backbone and the pyramid on it: encode(images) and from_embedding(embedding)
are the two halves of forward(images); neither guesses what it was given."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_backbone

from dessam_d2.modeling.sam_backbone import SAMFeaturePyramid


@pytest.fixture(scope="module")
def pyramid():
    torch.manual_seed(0)
    return build_backbone(tiny_cfg()).eval()  # 256 px, patch 16, 256 channels


def test_forward_is_encode_then_from_embedding(pyramid):
    assert isinstance(pyramid, SAMFeaturePyramid)
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        embedding = pyramid.encode(images)
        features = pyramid(images)
        again = pyramid.from_embedding(embedding)
    assert embedding.shape == (2, 256, 16, 16)
    assert list(features) == ["p2", "p3", "p4", "p5"]
    assert all(torch.equal(features[k], again[k]) for k in features)
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "p2": (64, 64),
        "p3": (32, 32),
        "p4": (16, 16),
        "p5": (8, 8),
    }
    assert torch.equal(pyramid.net(images)["sam_embed"], embedding)  # Detectron2's Backbone


def test_from_embedding_takes_a_cropped_embedding(pyramid):
    with torch.no_grad():
        features = pyramid.from_embedding(torch.randn(1, 256, 8, 16))
    assert tuple(features["p2"].shape[-2:]) == (32, 64) and tuple(features["p5"].shape) == (
        1,
        64,
        4,
        8,
    )


@pytest.mark.parametrize(
    "shape", [(1, 3, 256, 256), (1, 3, 16, 16), (1, 256, 17, 16), (256, 16, 16)]
)
def test_from_embedding_refuses_what_is_not_an_embedding(pyramid, shape):
    with pytest.raises(ValueError, match="expected SAM embeddings"):
        pyramid.from_embedding(torch.zeros(shape))


def test_encode_refuses_an_unpadded_image(pyramid):
    with pytest.raises(ValueError, match="256x256 inputs"):
        pyramid.encode(torch.zeros(1, 3, 200, 256))
