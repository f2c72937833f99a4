"""Official SAM checkpoints load strictly through one function; bad files fail clearly."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from segment_anything import sam_model_registry

from dessam_d2.errors import SAMCheckpointError
from dessam_d2.modeling.sam_weights import load_sam_checkpoint


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A full-size ViT-B SAM with random weights, saved exactly as the official file is."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def vit_b_cfg(checkpoint):
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.SAM.VARIANT", "vit_b", "MODEL.SAM.IMAGE_SIZE", 1024])
    cfg.merge_from_list(
        ["MODEL.SAM.DECODER_MLP_DIM", 2048, "MODEL.SAM.CHECKPOINT", str(checkpoint)]
    )
    return cfg


def test_full_size_vit_b_checkpoint_places_every_tensor(vit_b_checkpoint):
    path, state = vit_b_checkpoint
    assert len(state) == 314  # as in the official sam_vit_b_01ec64.pth
    model = build_model(vit_b_cfg(path))
    placed = {}
    for prefix, module in model.sam_parts().items():
        for k, v in module.state_dict().items():
            placed[f"{prefix}.{k}"] = v
    assert len(placed) == 314
    assert set(placed) == set(state)
    for k, v in placed.items():
        assert torch.equal(v, state[k]), k
    encoder = sum(p.numel() for p in model.image_encoder.encoder.parameters())
    decoder = sum(p.numel() for p in model.mask_head.mask_decoder.parameters())
    assert round(encoder / 1e6, 2) == 89.67 and round(decoder / 1e6, 2) == 4.06


def test_truncated_file_is_a_clear_error(vit_b_checkpoint, tmp_path):
    path, _ = vit_b_checkpoint
    bad = tmp_path / "sam_vit_b_truncated.pth"
    bad.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(SAMCheckpointError, match=r"sam_vit_b_truncated\.pth cannot be read"):
        build_model(vit_b_cfg(bad))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(SAMCheckpointError, match=r"nowhere\.pth does not exist"):
        build_model(vit_b_cfg(tmp_path / "nowhere.pth"))


def test_wrong_variant_is_refused_before_loading(vit_b_checkpoint):
    path, _ = vit_b_checkpoint
    model = build_model(tiny_cfg())
    with pytest.raises(
        SAMCheckpointError, match="is a vit_b checkpoint but MODEL.SAM.VARIANT is vit_l"
    ):
        load_sam_checkpoint(model.sam_parts(), str(path), "vit_l")


def test_mismatched_shapes_and_keys_are_listed(vit_b_checkpoint, tmp_path):
    path, state = vit_b_checkpoint
    model = build_model(tiny_cfg())
    with pytest.raises(
        SAMCheckpointError, match=r"shape mismatch \(file vs model\): image_encoder"
    ):
        load_sam_checkpoint(model.sam_parts(), str(path), "custom")
    partial = {k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_token")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "edited.pth")
    cfg_model = build_model(vit_b_cfg(path))
    with pytest.raises(SAMCheckpointError) as err:
        load_sam_checkpoint(cfg_model.sam_parts(), str(tmp_path / "edited.pth"), "vit_b")
    msg = str(err.value)
    assert "edited.pth" in msg and "missing keys: mask_decoder.iou_token.weight" in msg
    assert "unexpected keys: extra.weight" in msg and "\n" not in msg


def test_not_a_state_dict(tmp_path):
    bad = tmp_path / "list.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(SAMCheckpointError, match="does not hold a state dict"):
        build_model(vit_b_cfg(bad))


def test_paper_trainable_parameter_count_for_vit_b(vit_b_checkpoint):
    """Trainable = SFP + RPN + 4conv1fc box head (pooler 7) + 1 token; the paper says 18.34M."""
    cfg = vit_b_cfg(vit_b_checkpoint[0])
    for k in ("MODEL.FPN.OUT_CHANNELS", "MODEL.ROI_BOX_HEAD.CONV_DIM"):
        cfg.merge_from_list([k, 256])
    cfg.merge_from_list(["MODEL.ROI_BOX_HEAD.FC_DIM", 1024])
    model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert round(trainable / 1e6, 2) == 19.24
    assert round(frozen / 1e6, 2) == 93.74
