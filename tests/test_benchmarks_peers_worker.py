"""benchmarks/peers_worker.py: one peer in a process of its own, importing only numpy, torch and
the peer; its arguments, its timing loop and its JSON line."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks import peers_worker as pw


def test_it_imports_nothing_of_the_repository():
    """Run by its path, as the driver runs it in the peers' venv: --help needs only argparse."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['peers_worker.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('benchmarks/peers_worker.py', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('dessam_d2', 'benchmarks')]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "cellpose_sam_fp32" in proc.stdout  # the peers it knows


def test_arguments():
    args = pw.parse_args(["microsam_ais", "--inputs", "d", "--threads", "1", "--warmup", "0"])
    assert (args.name, args.inputs, args.threads, args.repeats, args.warmup) == (
        "microsam_ais",
        "d",
        1,
        3,
        0,
    )
    for bad in (["nnunet", "--inputs", "d"], ["cellpose_sam"]):
        with pytest.raises(SystemExit) as exc:
            pw.parse_args(bad)
        assert exc.value.code == 2
    assert set(pw.PARTS) == set(pw.PEERS)
    with pytest.raises(ValueError, match="unknown peer"):
        pw.build("nnunet", "d")


def test_a_peer_is_warmed_up_then_timed_and_reported_on_one_line(monkeypatch, capsys, one_thread):
    calls = []

    def fake_build(name, inputs):
        assert (name, inputs) == ("sam_predictor_100", "d")
        return lambda: calls.append(1) or {"encoder": 0.1, "decoder": 0.2}

    monkeypatch.setattr(pw, "build", fake_build)
    assert pw.main(["sam_predictor_100", "--inputs", "d", "--threads", "1", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(calls) == 3 and len(out["times"]) == 2 and out["threads"] == 1
    assert out["parts"] == [{"encoder": 0.1, "decoder": 0.2}] * 2
    assert out["rss_gb"] > 0 and out["build_s"] >= 0 and out["torch"]


@pytest.mark.parametrize(
    "name, dtype", [("sam_predictor_100", None), ("sam_predictor_100_bf16", 1)]
)
def test_sam_predictor_runs_its_boxes_at_the_named_precision(tmp_path, monkeypatch, name, dtype):
    """segment-anything's own predictor on the saved boxes; the _bf16 peer under bfloat16
    autocast (a small ViT at SAM's 1024 px input stands in for ViT-B)."""
    import numpy as np
    import segment_anything
    import torch
    from segment_anything.build_sam import _build_sam

    np.save(tmp_path / "image_100.npy", np.full((300, 280, 3), 128, np.uint8))
    np.save(tmp_path / "boxes_100.npy", np.array([[10, 10, 60, 70], [100, 90, 200, 150]], "f4"))
    small = _build_sam(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                       encoder_global_attn_indexes=[0], checkpoint=None)  # fmt: skip
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint: small)
    seen = []
    qkv = small.image_encoder.blocks[0].attn.qkv  # its products (SAM's LayerNorm2d ends in float32)
    qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.no_grad():
        parts = pw.build(name, str(tmp_path))()
    assert set(parts) == {"encoder", "decoder"} and min(parts.values()) > 0
    assert seen == [torch.bfloat16 if dtype else torch.float32]
