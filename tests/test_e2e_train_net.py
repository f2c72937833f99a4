"""tools/train_net.py end to end on the CPU: data-parallel ranks agree, logs, eval, user errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from dessam_d2.data.synthetic.cytology import make_synthetic_cytology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "MODEL.SAM.IMAGE_SIZE", "128",
    "MODEL.SAM.CHECKPOINT", "",  # the shipped tiny SAM is for 256 px
    "SOLVER.EPOCHS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
    "SEED", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2data")
    make_synthetic_cytology(
        str(root / "synthetic_cytology"), num_train=4, num_test=2, image_size=(128, 128)
    )
    return root


def run(args, data_root, check=True):
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "tools/train_net.py", "--config-file", "configs/dessam_demo.yaml"]
    proc = subprocess.run(
        cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def fingerprint(log_file):
    found = re.findall(r"final model fingerprint (\w+)", open(log_file).read())
    assert len(found) == 1, log_file
    return found[0]


def test_two_cpu_processes_train_the_same_model(data_root, tmp_path):
    out = tmp_path / "ddp"
    run(
        ["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "3"]
        + ["DATASETS.TEST", "()"]
        + TINY,
        data_root,
    )
    assert fingerprint(out / "log.txt") == fingerprint(out / "log.txt.rank1")
    assert (out / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    last = metrics[-1]
    assert last["iteration"] == 2 and "lr" in last
    terms = ("loss_rpn_cls", "loss_cls", "loss_box_reg", "loss_distill_bce", "loss_local_pairwise")
    for term in terms:
        assert term in last
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))


def test_training_evaluates_and_eval_only_reloads(data_root, tmp_path):
    out = tmp_path / "single"
    run(["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2"] + TINY, data_root)
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    evals = [m for m in metrics if "nuclei/PQ" in m]
    assert evals and {"nuclei/Dice", "nuclei/AJI", "nuclei/AJI+", "segm/AP", "bbox/AP"} <= set(
        evals[-1]
    )
    csv_file = (
        out / "inference" / "dessam_synthetic_test" / "nuclei_metrics_dessam_synthetic_test.csv"
    )
    assert len(open(csv_file).read().strip().splitlines()) == 1 + 2

    again = tmp_path / "eval"
    proc = run(
        ["--eval-only", "OUTPUT_DIR", str(again), "MODEL.WEIGHTS", str(out / "model_final.pth")]
        + TINY,
        data_root,
    )
    first = open(csv_file).read()
    second = (again / "inference" / "dessam_synthetic_test" / csv_file.name).read_text()
    assert first == second, proc.stdout[-2000:]


def test_a_config_key_that_does_not_exist_is_one_line(data_root, tmp_path):
    proc = run(["OUTPUT_DIR", str(tmp_path), "MODEL.NO_SUCH_KEY", "1"], data_root, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "MODEL.NO_SUCH_KEY" in proc.stderr and "Traceback" not in proc.stderr
