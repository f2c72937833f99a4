"""The demo's fully supervised reference (dessam_d2/recipes/reference.py): Detectron2's Mask R-CNN
head on the same detector and the same frozen SAM encoder."""

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import GeneralizedRCNN

from dessam_d2.config import load_config
from dessam_d2.data.datasets import register_nuclei_coco
from dessam_d2.data.synthetic.cytology import generate_synthetic_dataset
from dessam_d2.engine import Trainer
from dessam_d2.recipes.box_prior import gt_boxes_of
from dessam_d2.recipes.pretrain_tiny_sam import build_sam_parts, save_sam_checkpoint
from dessam_d2.recipes.reference import MaskSupervisedMapper, ReferenceTrainer, reference_config


@pytest.fixture(scope="module")
def cytology(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    json_file = generate_synthetic_dataset(str(root), 2, seed=3)
    register_nuclei_coco("reference_train", json_file, str(root / "images"))
    sam = root / "sam.pth"
    cfg = load_config("configs/dessam_demo.yaml", ["MODEL.SAM.CHECKPOINT", ""])
    torch.manual_seed(0)
    save_sam_checkpoint(build_sam_parts(cfg), str(sam))
    return root, str(sam)


def test_the_reference_reads_masks_through_the_same_resize(cytology):
    record = DatasetCatalog.get("reference_train")[0]
    cfg = load_config(
        "configs/dessam_demo.yaml", ["MODEL.SAM.IMAGE_SIZE", 128, "MODEL.SAM.PATCH_SIZE", 8]
    )
    out = MaskSupervisedMapper(cfg)(record)
    inst = out["instances"]
    assert tuple(out["image"].shape) == (3, 128, 128)  # 256 px images, longest side 128
    assert len(inst) == len(gt_boxes_of(record)) and inst.gt_masks.tensor.shape[-2:] == (128, 128)
    # each mask lies in its (halved) box
    for box, mask in zip(inst.gt_boxes.tensor, inst.gt_masks.tensor):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1


def test_the_reference_is_mask_rcnn_on_the_same_frozen_sam_encoder(cytology, tmp_path, one_thread):
    _, sam = cytology
    opts = [
        "MODEL.SAM.CHECKPOINT",
        sam,
        "DATASETS.TRAIN",
        "('reference_train',)",
        "DATASETS.TEST",
        "()",
    ]
    opts += [
        "SOLVER.EPOCHS",
        0,
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.STEPS",
        "()",
        "SOLVER.WARMUP_ITERS",
        1,
    ]
    opts += ["DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path), "TEST.EVAL_PERIOD", 0]
    cfg = load_config("configs/dessam_demo.yaml", [str(o) for o in opts])
    ref = reference_config(cfg)
    assert ref.OUTPUT_DIR == str(tmp_path / "reference_mask_rcnn")
    dessam = Trainer.build_model(cfg)
    trainer = ReferenceTrainer(ref)
    model = trainer.model
    assert isinstance(model, GeneralizedRCNN)
    assert type(model.roi_heads.mask_head).__name__ == "MaskRCNNConvUpsampleHead"
    mine, theirs = (
        model.backbone.net.encoder.state_dict(),
        dessam.image_encoder.encoder.state_dict(),
    )
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not any(p.requires_grad for p in model.backbone.net.parameters())  # frozen as DES-SAM's
    before = {k: v.clone() for k, v in model.roi_heads.mask_head.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()  # two steps on the masks
    after = model.roi_heads.mask_head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(mine[k], model.backbone.net.encoder.state_dict()[k]) for k in mine)
    # The demo config fits the threshold after training (TEST.SCORE_THRESH_AUTO), as DES-SAM's;
    # Trainer.test sets each test set's score threshold through the same method
    assert cfg.TEST.SCORE_THRESH_AUTO and model.fitted_score_threshold is not None
    assert model.set_score_threshold(0.3) == pytest.approx(model.fitted_score_threshold)
    assert model.roi_heads.box_predictor.test_score_thresh == 0.3


def test_the_reference_reads_the_embeddings_des_sam_stored(cytology, tmp_path, one_thread):
    """One frozen encoder, one image: DES-SAM encodes it, the reference reads it back."""
    from dessam_d2.data.mapper import DESSAMDatasetMapper

    _, sam = cytology
    cache = str(tmp_path / "cache")
    opts = ["MODEL.SAM.CHECKPOINT", sam, "DATASETS.TRAIN", "('reference_train',)"]
    cfg = load_config(
        "configs/dessam_demo.yaml", opts + ["MODEL.DESSAM.EMBEDDING_CACHE_DIR", cache]
    )
    dessam = Trainer.build_model(cfg).eval()
    torch.manual_seed(0)
    reference = ReferenceTrainer.build_model(reference_config(cfg)).eval()
    torch.manual_seed(0)
    plain = ReferenceTrainer.build_model(
        reference_config(load_config("configs/dessam_demo.yaml", opts))
    )
    plain.eval()
    inputs = [DESSAMDatasetMapper(cfg, is_train=False)(DatasetCatalog.get("reference_train")[0])]
    with torch.no_grad():
        dessam(inputs)
        assert dessam.embedding_cache.stats()["writes"] == 1
        images = reference.preprocess_image(inputs)
        cached = reference.backbone(images.tensor)
        fresh = plain.backbone(plain.preprocess_image(inputs).tensor)
    stats = reference.embedding_cache.stats()
    assert (stats["hits"], stats["misses"], stats["writes"]) == (1, 0, 0)
    for level in fresh:  # the same features, up to the cache's float16 rounding
        assert torch.allclose(cached[level], fresh[level], atol=2e-2, rtol=2e-2)
