"""The demo's tiny SAM pretraining (dessam_d2/recipes/pretrain_tiny_sam.py) and its synthetic
scenes: official checkpoint format through the strict loader, exact resume, tied decoder keys at
initialisation, general scenes that share no code with the cytology generator."""

import ast
import inspect
import json

import numpy as np
import pytest
import torch

from dessam_d2.config import load_config
from dessam_d2.data.synthetic import cytology, shapes
from dessam_d2.data.synthetic.shapes import render_shapes_scene
from dessam_d2.modeling.sam_weights import load_sam_checkpoint
from dessam_d2.recipes.pretrain_tiny_sam import (
    build_sam_parts,
    pretrain_tiny_sam,
    tie_attention_keys,
)

SHAPES = ["MODEL.SAM.CHECKPOINT", "", "MODEL.SAM.IMAGE_SIZE", 64, "MODEL.SAM.ENCODER_EMBED_DIM", 32]
SHAPES += ["MODEL.SAM.ENCODER_WINDOW_SIZE", 4, "MODEL.SAM.PROMPT_EMBED_DIM", 32]
SHAPES += ["MODEL.SAM.DECODER_MLP_DIM", 64]


@pytest.fixture
def cfg():
    return load_config("configs/dessam_demo.yaml", [str(v) for v in SHAPES])


def _run(cfg, path, **kwargs):
    args = dict(iterations=3, batch=1, max_boxes=2, log_every=1, save_every=1, warmup=1)
    return pretrain_tiny_sam(cfg, str(path), **{**args, **kwargs})


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_pretraining_writes_an_official_checkpoint_the_strict_loader_takes(
    cfg, tmp_path, one_thread
):
    log = _run(cfg, tmp_path / "sam.pth", eval_every=3)
    state = _state(tmp_path / "sam.pth")
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    load_sam_checkpoint(build_sam_parts(cfg), str(tmp_path / "sam.pth"))  # raises on a mismatch
    assert [e["iter"] for e in log["held_out"]] == [3]
    assert 0.0 <= log["held_out_iou_after"] <= 1.0 and log["tie_keys"]
    json.dumps(log)  # the tool writes it as JSON


def test_an_interrupted_pretraining_resumes_exactly(cfg, tmp_path, one_thread):
    _run(cfg, tmp_path / "straight.pth")
    _run(cfg, tmp_path / "resumed.pth", stop_after=2)  # "interrupted" after 2 of 3 iterations
    log = _run(cfg, tmp_path / "resumed.pth")  # the same command again continues at 2
    a, b = _state(tmp_path / "straight.pth"), _state(tmp_path / "resumed.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["iter"] for e in log["losses"]] == [1, 2, 3]


def test_tied_keys_start_equal_to_the_queries_and_train_apart(cfg):
    decoder = build_sam_parts(cfg)["mask_decoder"]
    assert tie_attention_keys(decoder) == 5  # 2 blocks x 2 cross-attentions + the final one
    for name, m in decoder.named_modules():
        if name.endswith(("token_to_image", "image_to_token")):
            assert torch.equal(m.k_proj.weight, m.q_proj.weight)
            assert m.k_proj.weight.requires_grad  # a start, not a constraint
        elif name.endswith("self_attn"):
            assert not torch.equal(m.k_proj.weight, m.q_proj.weight)


def test_scenes_are_general_both_polarities_touching_blurred():
    darker = lighter = occluded = 0
    for seed in range(40):
        image, masks = render_shapes_scene(seed, 128)
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        assert all(m.shape == (128, 128) and m.sum() >= 20 for m in masks)
        union = np.zeros((128, 128), bool)
        for m in masks:
            assert not (union & m).any()  # visible masks are disjoint
            union |= m
        grey = image.mean(-1)
        for m in masks:
            inside, outside = grey[m].mean(), grey[~union].mean()
            darker += inside < outside - 20
            lighter += inside > outside + 20
        occluded += sum(
            (np.roll(a, 1, 0) & b).any() or (np.roll(a, 1, 1) & b).any()
            for i, a in enumerate(masks)
            for b in masks[i + 1 :]
        )
    assert darker > 20 and lighter > 20 and occluded > 10, (darker, lighter, occluded)
    a, b = render_shapes_scene(3, 64), render_shapes_scene(3, 64)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


def _functions(module):
    tree = ast.parse(inspect.getsource(module))
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    bodies = {
        ast.dump(ast.Module(body=n.body, type_ignores=[]))
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef)
    }
    imports = {
        "." * n.level + (n.module or "") + ":" + ",".join(a.name for a in n.names)
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
    }
    return names, bodies, imports


def test_the_pretraining_scenes_share_no_code_with_the_cytology_generator():
    shape_names, shape_bodies, shape_imports = _functions(shapes)
    cyto_names, cyto_bodies, cyto_imports = _functions(cytology)
    assert not shape_bodies & cyto_bodies
    assert not shape_names & cyto_names
    # neither imports the other or a common project helper: only numpy/cv2/typing
    project = [i for i in shape_imports if i.startswith((".", "dessam_d2"))]
    assert not project, project
    assert not any("shapes" in i for i in cyto_imports)
