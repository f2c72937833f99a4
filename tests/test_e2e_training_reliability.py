"""Training that survives: same seed -> same losses, a killed run resumes exactly, NaN stops it
cleanly, checkpoints are atomic and a truncated one is a one-line error.

The tools/train_net.py runs are tiny (128 px, 4 images, batch 2) and use --deterministic.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dessam_d2.data.synthetic.cytology import make_synthetic_cytology

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
