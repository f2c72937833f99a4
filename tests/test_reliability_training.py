"""Training that survives: same seed -> same losses, a killed run resumes exactly, NaN stops it
cleanly, checkpoints are atomic and a truncated one is a one-line error.

The tools/train_net.py runs are tiny (128 px, 4 images, batch 2) and use --deterministic.
"""

import itertools
import json
import math
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import make_instances, synthetic_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from dessam_d2.checkpointing import CheckpointError, DESSAMCheckpointer, NonFiniteError
from dessam_d2.data import DESSAMDatasetMapper
from dessam_d2.data.samplers import ResumableTrainingSampler, SeededMapDataset
from dessam_d2.data.synthetic import make_synthetic_cytology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "MODEL.SAM.CHECKPOINT", "",  # a random tiny SAM whatever the demo config loads
    "MODEL.SAM.IMAGE_SIZE", "128",
    "SOLVER.EPOCHS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.MAX_ITER", "8",
    "SOLVER.CHECKPOINT_PERIOD", "3",
    "DATALOADER.NUM_WORKERS", "1",
    "INPUT.RANDOM_FLIP", "both",
    "DATASETS.TEST", "()",
    "SEED", "3",
]  # fmt: skip

# Makes loss_local_pairwise NaN at iteration $NAN_AT, then runs tools/train_net.py.
NAN_DRIVER = """
import os, runpy, sys
from detectron2.utils.events import get_event_storage
from dessam_d2.modeling.meta_arch import DESSAM
forward = DESSAM.forward
def nan_at(self, batched_inputs):
    out = forward(self, batched_inputs)
    if self.training and get_event_storage().iter == int(os.environ["NAN_AT"]):
        out["loss_local_pairwise"] = out["loss_local_pairwise"] * float("nan")
    return out
DESSAM.forward = nan_at
sys.argv = ["tools/train_net.py"] + sys.argv[1:]
runpy.run_path("tools/train_net.py", run_name="__main__")
"""

# SIGKILLs the training process itself when iteration $KILL_AT starts.
KILL_DRIVER = """
import os, runpy, signal, sys
from detectron2.utils.events import get_event_storage
from dessam_d2.modeling.meta_arch import DESSAM
forward = DESSAM.forward
def kill_at(self, batched_inputs):
    if self.training and get_event_storage().iter == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, batched_inputs)
DESSAM.forward = kill_at
sys.argv = ["tools/train_net.py"] + sys.argv[1:]
runpy.run_path("tools/train_net.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2data")
    make_synthetic_cytology(
        str(root / "synthetic_cytology"), num_train=4, num_test=1, image_size=(128, 128)
    )
    return root


def command(out, opts=(), flags=("--deterministic",), driver=None):
    head = ["-c", driver] if driver else ["tools/train_net.py"]
    return (
        [sys.executable] + head + ["--config-file", "configs/dessam_demo.yaml"] + list(flags)
        + TINY + ["OUTPUT_DIR", str(out)] + list(opts)
    )  # fmt: skip


def environment(data_root, **extra):
    return dict(os.environ, DETECTRON2_DATASETS=str(data_root), OMP_NUM_THREADS="1", **extra)


def train(data_root, out, opts=(), flags=("--deterministic",), driver=None, check=True, **env):
    proc = subprocess.run(
        command(out, opts, flags, driver),
        cwd=ROOT,
        env=environment(data_root, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out):
    """iteration -> logged losses; a resumed run's line replaces the killed run's."""
    by_iter = {}
    for line in open(out / "losses.jsonl"):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        by_iter[entry.pop("iteration")] = entry
    return by_iter


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    return last


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(data_root, out)
    return out


def test_two_runs_with_the_same_seed_log_identical_losses(data_root, uninterrupted, tmp_path):
    first = losses(uninterrupted)
    # also whatever the number of DataLoader workers: augmentations are seeded per stream item
    train(data_root, tmp_path, opts=["DATALOADER.NUM_WORKERS", "0"])
    second = losses(tmp_path)
    assert sorted(first) == list(range(8))
    terms = {"total_loss", "lr", "loss_cls", "loss_distill_bce", "loss_local_pairwise"}
    assert terms <= set(first[7])
    assert first == second  # exact: every term, every iteration


def test_a_killed_run_resumes_at_its_checkpoint_with_the_same_losses(
    data_root, uninterrupted, tmp_path
):
    # Killed at a known point: by itself, when iteration 4 starts (after the checkpoint of
    # iteration 2, CHECKPOINT_PERIOD 3, and the losses of iterations 0..3).
    proc = train(data_root, tmp_path, driver=KILL_DRIVER, check=False, KILL_AT="4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    log = tmp_path / "losses.jsonl"
    killed_lines = len(log.read_text().splitlines())
    assert killed_lines == 4
    assert not (tmp_path / "model_final.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    done = 2
    # What a kill during a save leaves: a hidden temporary file, cleaned up by the next run.
    (tmp_path / ".model_0000005.pth.x1y2z3.tmp").write_bytes(b"half a checkpoint")

    proc = train(data_root, tmp_path, flags=("--deterministic", "--resume"))
    assert f"Starting training from iteration {done + 1}" in proc.stdout
    assert not list(tmp_path.glob(".*.tmp"))
    assert len(log.read_text().splitlines()) == killed_lines + 7 - done
    resumed, expected = losses(tmp_path), losses(uninterrupted)
    assert [resumed[i] for i in range(done + 1, 8)] == [expected[i] for i in range(done + 1, 8)]
    assert [resumed[i] for i in range(done + 1)] == [expected[i] for i in range(done + 1)]


def test_a_nan_loss_stops_training_in_one_line_and_saves_nothing_after_it(data_root, tmp_path):
    proc = train(
        data_root,
        tmp_path,
        opts=["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1"],
        driver=NAN_DRIVER,
        check=False,
        NAN_AT="2",
    )
    last = assert_one_line_error(
        proc, "iteration 2", "non-finite loss_local_pairwise", "model_0000001.pth"
    )
    assert "loss_cls" not in last
    saved = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert saved == ["model_0000000.pth", "model_0000001.pth"]  # no model_0000002, no final
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    model = torch.load(tmp_path / "model_0000001.pth", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_a_truncated_last_checkpoint_is_a_one_line_error(data_root, uninterrupted, tmp_path):
    data = (uninterrupted / "model_0000005.pth").read_bytes()
    (tmp_path / "model_0000005.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    proc = train(data_root, tmp_path, flags=("--resume",), check=False)
    assert_one_line_error(proc, "model_0000005.pth", "last_checkpoint", "truncated")


# ------------------------------------------------------------------------ in-process checks


def test_the_sampler_resumes_its_stream_and_seeds_items_by_position():
    def stream(start_iter, n):
        sampler = ResumableTrainingSampler(5, batch_size_per_rank=2, seed=7)
        sampler.start_iter = start_iter
        return list(itertools.islice(iter(sampler), n))

    whole = stream(0, 40)
    assert stream(3, 34) == whole[6:]  # iteration 3 starts at item 3 x 2
    indices = [index for _, index in whole]
    assert sorted(indices[:5]) == sorted(indices[5:10]) == list(range(5))  # epochs
    assert len({seed for seed, _ in whole}) == 40  # a seed per position, not per image

    flips = SeededMapDataset(list(range(5)), lambda i: (i, np.random.rand(), torch.rand(1)))
    assert str([flips[k] for k in whole[6:12]]) == str([flips[k] for k in stream(3, 6)])


def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def test_checkpoints_are_atomic_and_a_nan_model_is_never_saved(tmp_path, monkeypatch):
    model = tiny_model()
    checkpointer = DESSAMCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model_0000001.pth").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600

    def killed_while_writing(data, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            checkpointer.save("model_0000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]

    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="not saving .*model_0000003.pth.*non-finite"):
        checkpointer.save("model_0000003")
    assert not (tmp_path / "model_0000003.pth").exists()
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_loading_checks_the_file_and_the_model_strictly(tmp_path):
    model = tiny_model()
    DESSAMCheckpointer(model, str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    DESSAMCheckpointer(tiny_model()).load(path)  # the same config loads

    other = build_model(tiny_cfg(**{"MODEL.SAM.ENCODER_EMBED_DIM": 32}))
    with pytest.raises(CheckpointError, match="does not fit the model.*shape mismatch") as e:
        DESSAMCheckpointer(other).load(path)
    assert "\n" not in str(e.value) and path in str(e.value)

    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="official SAM checkpoint.*MODEL.SAM.CHECKPOINT"):
        DESSAMCheckpointer(tiny_model()).load(str(tmp_path / "sam.pth"))

    data = open(path, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="cut.pth cannot be read.*truncated") as e:
        DESSAMCheckpointer(tiny_model()).load(str(tmp_path / "cut.pth"))
    assert "\n" not in str(e.value)

    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointError, match="model_0000009.pth .named in .*last_checkpoint"):
        DESSAMCheckpointer(tiny_model(), str(tmp_path)).resume_or_load("", resume=True)


def _finite_losses(model, batch):
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    assert losses and all(math.isfinite(float(v)) for v in losses.values()), losses
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    model.zero_grad()
    return losses


@pytest.mark.parametrize("overrides", [{}, {"MODEL.DESSAM.PAIRWISE_LOSS": "boxinst"}])
def test_no_nuclei_and_degenerate_boxes_give_finite_losses(tmp_path, one_thread, overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg(**overrides)
    model = build_model(cfg).train()
    # an image with no nuclei, alone and next to one with nuclei: the same terms, all finite
    alone = _finite_losses(model, [synthetic_input(0, boxes=())])
    assert _finite_losses(model, [synthetic_input(0, boxes=()), synthetic_input(1)]).keys() == (
        alone.keys()
    )

    # all boxes degenerate (zero or negative size, outside the image): the mapper drops every one
    cv2.imwrite(str(tmp_path / "img.png"), np.full((100, 120, 3), 200, np.uint8))
    boxes = [[10, 10, 0, 20], [30, 30, -5, 10], [40, 40, 10, -3], [500, 500, 20, 20]]
    boxes += [[-50, 10, 20, 20], [10, 10, float("nan"), 5]]
    record = {
        "file_name": str(tmp_path / "img.png"),
        "image_id": 1,
        "height": 100,
        "width": 120,
        "annotations": [
            {"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0} for b in boxes
        ],
    }
    mapped = DESSAMDatasetMapper(cfg, is_train=True)(record)
    assert len(mapped["instances"]) == 0
    # next to the thinnest boxes the mapper keeps (1 px)
    thin = synthetic_input(2)
    size = thin["instances"].image_size
    thin["instances"] = make_instances([[10, 10, 11, 40], [50, 50, 90, 51], [9, 9, 10, 10]], size)
    _finite_losses(model, [mapped, thin])
