"""tools/reproduce_paper.py (dessam_d2/recipes/reproduce.py) end to end: CNSeg labelme and ISBI
.mat fixtures in their real formats, a tiny random SAM saved in the official checkpoint format, 2
iterations per run, two seeds."""

import csv
import json
import math
import os
import re
import runpy

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_cfg
from detectron2.modeling import build_model
from test_data_converters_cnseg import _label
from test_data_converters_isbi2014 import _write_v73

from dessam_d2.cli import run_cli
from dessam_d2.recipes.reproduce import train_command
from dessam_d2.recipes.reproduce_tables import write_tables

TOOL = runpy.run_path(os.path.join(ROOT, "tools", "reproduce_paper.py"))  # not as __main__
main, parse_args = TOOL["main"], TOOL["parse_args"]

TINY = [
    "MODEL.SAM.VARIANT", "custom",
    "MODEL.SAM.IMAGE_SIZE", "128",
    "MODEL.SAM.ENCODER_EMBED_DIM", "64",
    "MODEL.SAM.ENCODER_DEPTH", "2",
    "MODEL.SAM.ENCODER_NUM_HEADS", "2",
    "MODEL.SAM.ENCODER_GLOBAL_ATTN_INDEXES", "[1]",
    "MODEL.SAM.ENCODER_WINDOW_SIZE", "4",
    "MODEL.SAM.DECODER_MLP_DIM", "256",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ROI_BOX_HEAD.CONV_DIM", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64]]",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.DESSAM.EMBEDDING_CACHE_DIR", "",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "TEST.DETECTIONS_PER_IMAGE", "20",
    "SOLVER.EPOCHS", "0",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
CENTRES = [(16, 16, 7), (44, 20, 9), (30, 46, 8)]  # (x, y, radius) of each nucleus


def _nuclei_image(path, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(190, 230, (64, 64, 3), dtype=np.uint8)
    for x, y, r in CENTRES:
        cv2.circle(image, (x, y), r, (90, 50, 120), -1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), image)
    return image


def _outline(x, y, r, n=12):
    return [
        [x + r * math.cos(2 * math.pi * k / n), y + r * math.sin(2 * math.pi * k / n)]
        for k in range(n)
    ]


def _cnseg(root):
    """CNSeg's layout: PatchSeg images/labels folders, ClusterSeg parts, DomainSeg targets."""
    folders = {
        "PatchSeg/train-images": ("PatchSeg/train-labels", 2),
        "PatchSeg/test-images": ("PatchSeg/test-labels", 1),
        "ClusterSeg/sample": ("ClusterSeg/sample", 2),
        "ClusterSeg/test-sample": ("ClusterSeg/test-sample", 1),
        "DomainSeg/TargetA": ("DomainSeg/TargetA", 1),
        "DomainSeg/TargetB": ("DomainSeg/TargetB", 2),
    }
    seed = 0
    for images, (labels, count) in folders.items():
        for k in range(count):
            seed += 1
            stem = f"{images.split('/')[-1].lower()}_{k}"
            _nuclei_image(root / images / f"{stem}.jpg", seed)
            _label(root / labels / f"{stem}.json", [_outline(*c) for c in CENTRES], 64, 64)


def _isbi(folder):
    """The 900-image synthetic test set's format (MATLAB v7.3), here 1 image."""
    folder.mkdir(parents=True)
    gray = _nuclei_image(folder / "unused.png", 99)[..., 0]
    os.remove(folder / "unused.png")
    mask = np.zeros((64, 64), np.uint8)
    for x, y, r in CENTRES:
        cv2.circle(mask, (x, y), r, 1, -1)
    _write_v73(
        folder / "isbi_test90.mat", {"ISBI_Test": [gray], "test_Nuclei": [mask.astype(bool)]}
    )


def _tiny_sam_checkpoint(path):
    """A random tiny SAM written as the official files are: one flat state dict whose keys start
    with image_encoder. / prompt_encoder. / mask_decoder."""
    cfg = tiny_cfg(**{"MODEL.SAM.IMAGE_SIZE": 128})
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {
        f"{part}.{key}": value
        for part, module in model.sam_parts().items()
        for key, value in module.state_dict().items()
    }
    torch.save(state, path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce_sources")
    _cnseg(root / "CNSeg")
    _isbi(root / "isbi")
    _tiny_sam_checkpoint(root / "sam_tiny.pth")
    (root / "targetb60.txt").write_text("targetb_1.jpg\n")  # 1 of TargetB's 2 images
    return root


def _argv(sources, out, *extra):
    return [
        "--sam-checkpoint", str(sources / "sam_tiny.pth"),
        "--cnseg", str(sources / "CNSeg"),
        "--isbi", str(sources / "isbi"),
        "--datasets", str(out / "datasets"),
        "--output", str(out / "runs"),
        *extra,
    ]  # fmt: skip


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _run_means(runs, setting, name, prefix=""):
    """Independent truth: means over images of the run's own per-image CSV."""
    values = []
    for seed in (1, 2):
        path = runs / setting / f"seed{seed}" / "inference" / name / f"nuclei_metrics_{name}.csv"
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        values.append(
            [np.mean([float(r[prefix + m]) for r in rows]) for m in ("Dice", "AJI", "PQ")]
        )
    return np.mean(values, axis=0), np.std(values, axis=0, ddof=1)


def _stamps(runs):
    return {
        str(p.relative_to(runs)): p.stat().st_mtime_ns
        for p in sorted(runs.glob("*/seed*/*"))
        if p.name in ("results.json", "model_final.pth", "losses.jsonl")
    }


def test_reproduce_tables_and_resume(sources, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("DESSAM_MALLOC_TUNING", "0")  # no re-exec: one interpreter start per run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = _argv(
        sources, tmp_path, "--seeds", "1", "2", "--targetb-list", str(sources / "targetb60.txt")
    )
    runs = tmp_path / "runs"
    main(argv + TINY)
    first = capfd.readouterr().out
    assert first.count("] training in") == 4

    # Table 1: PatchSeg and ClusterSeg test; Table 2: TargetA, TargetB, 2014ISBI.
    t1, t2 = _csv(runs / "table1.csv"), _csv(runs / "table2.csv")
    assert t1[0] == ["Method"] + [
        f"{s} {m}" for s in ("PatchSeg", "ClusterSeg") for m in ("Dice", "AJI", "PQ")
    ]
    assert t2[0] == ["Method"] + [
        f"{s} {m}" for s in ("TargetA", "TargetB", "2014ISBI") for m in ("Dice", "AJI", "PQ")
    ]
    release = "DES-SAM (this code), release protocol"
    assert [row[0] for row in t1] == [
        "Method",
        "DES-SAM (paper)",
        "DES-SAM (this code) mean",
        "DES-SAM (this code) std",
        "DES-SAM (this code) seed 1",
        "DES-SAM (this code) seed 2",
        f"{release} mean",
        f"{release} std",
        f"{release} seed 1",
        f"{release} seed 2",
    ]
    assert t1[1][1:] == ["83.37", "69.99", "69.85", "83.58", "70.02", "70.16"]
    assert t2[1][1:] == [
        "76.15",
        "59.07",
        "60.45",
        "76.58",
        "59.23",
        "63.63",
        "83.98",
        "71.37",
        "80.81",
    ]
    for table in (t1, t2):  # every cell filled: both seeds of both settings are in
        assert all(len(row) == len(table[0]) and all(row) for row in table)
    for col, (setting, name) in enumerate(
        [("patchseg", "cnseg_patchseg_test"), ("clusterseg", "cnseg_clusterseg_test")]
    ):
        mean, std = _run_means(runs, setting, name)
        np.testing.assert_allclose(
            [float(v) for v in t1[2][1 + 3 * col : 4 + 3 * col]], mean, atol=0.006
        )
        np.testing.assert_allclose(
            [float(v) for v in t1[3][1 + 3 * col : 4 + 3 * col]], std, atol=0.006
        )
        mean, _ = _run_means(runs, setting, name, prefix="release_")  # the release's protocol
        np.testing.assert_allclose(
            [float(v) for v in t1[6][1 + 3 * col : 4 + 3 * col]], mean, atol=0.006
        )
    mean, _ = _run_means(runs, "clusterseg", "cnseg_domainseg_targetb60_test")
    np.testing.assert_allclose([float(v) for v in t2[2][4:7]], mean, atol=0.006)

    md = (runs / "tables.md").read_text()
    assert "| DES-SAM (paper) | 83.37 | 69.99 | 69.85 | 83.58 | 70.02 | 70.16 |" in md
    ours = [line for line in md.splitlines() if line.startswith("| DES-SAM (this code) |")]
    assert len(ours) == 2
    assert sum(line.startswith(f"| {release} |") for line in md.splitlines()) == 2
    assert "Dice is the pixel Dice" in md and "bfloat16" not in md.split("## Table 1")[1]
    assert [len(re.findall(r"\| \d+\.\d\d ± \d+\.\d\d ", line)) for line in ours] == [6, 9]
    for split, name, threshold in (
        ("PatchSeg", "cnseg_patchseg_test", 0.55),
        ("ClusterSeg", "cnseg_clusterseg_test", 0.55),
        ("TargetA", "cnseg_domainseg_targeta_test", 0.05),
        ("TargetB", "cnseg_domainseg_targetb60_test", 0.05),
        ("2014ISBI", "isbi2014_test", 0.05),
    ):
        note = (
            f"{split}: 2 of 2 runs (seeds 1, 2); {name}, 1 image, box score threshold {threshold}"
        )
        assert note in md
    log = (runs / "clusterseg/seed1/log.txt").read_text()
    assert "Evaluating cnseg_domainseg_targeta_test with box score threshold 0.05" in log

    results = json.loads((runs / "clusterseg/seed1/results.json").read_text())
    assert set(results["test_sets"]) == {
        "cnseg_clusterseg_test",
        "cnseg_domainseg_targeta_test",
        "cnseg_domainseg_targetb60_test",
        "isbi2014_test",
    }

    # Again: every run is done, nothing is trained or evaluated, the tables are the same.
    before, tables = _stamps(runs), md
    main(argv + TINY)
    again = capfd.readouterr().out
    assert again.count("] done (") == 4 and "training in" not in again
    assert _stamps(runs) == before and (runs / "tables.md").read_text() == tables

    # One run's results removed: only that run is started again, with --resume from its final
    # checkpoint, so it is evaluated again without training (an interrupted run would continue
    # training from its last checkpoint the same way).
    os.remove(runs / "patchseg/seed2/results.json")
    main(argv + TINY)
    third = capfd.readouterr().out
    assert third.count("] done (") == 3
    assert "[patchseg seed 2] resuming from its last checkpoint" in third
    log = (runs / "patchseg/seed2/log.txt").read_text()
    assert "Starting training from iteration 2" in log  # = SOLVER.MAX_ITER: nothing to train
    after = _stamps(runs)
    assert {k for k in after if after[k] != before[k]} == {"patchseg/seed2/results.json"}
    assert (runs / "tables.md").read_text() == tables


def test_missing_checkpoint_or_folder_is_one_line(sources, tmp_path, capsys):
    argv = _argv(sources, tmp_path)
    argv[1] = str(tmp_path / "nope.pth")
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SAM checkpoint") and str(tmp_path / "nope.pth") in err
    assert err.count("\n") == 1
    argv = _argv(sources, tmp_path)
    argv[5] = str(tmp_path / "no_isbi")
    with pytest.raises(SystemExit):
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert err == f"error: --isbi {tmp_path / 'no_isbi'}: folder not found; pass the folder of " + (
        "the ISBI 2014 .mat files\n"
    )


def test_runs_get_the_launcher_flags_seed_and_overrides(tmp_path):
    args = parse_args(
        ["--sam-checkpoint", "sam.pth", "--cnseg", "c", "--isbi", "i", "--output", "out"]
        + ["--num-gpus", "4", "--num-machines", "2", "--machine-rank", "1"]
        + ["--dist-url", "tcp://h:1", "MODEL.DEVICE", "cuda"]
    )
    cmd = train_command(args, "clusterseg", 3, str(tmp_path))
    assert cmd[1].endswith("tools/train_net.py") and cmd[3].endswith(
        "configs/dessam_clusterseg.yaml"
    )
    flags = " ".join(cmd[4:])
    assert "--resume --num-gpus 4 --num-machines 2 --machine-rank 1 --dist-url tcp://h:1" in flags
    assert f"SEED 3 OUTPUT_DIR {os.path.join('out', 'clusterseg', 'seed3')}" in flags
    assert cmd[-2:] == ["MODEL.DEVICE", "cuda"]  # the user's overrides come last and win
    assert "MODEL.DESSAM.INFERENCE_DTYPE float32" in flags  # never "auto" = bfloat16 on a GPU
    bf16 = train_command(args, "clusterseg", 3, str(tmp_path), bf16_eval=True)
    assert "--eval-only" in bf16 and "--resume" not in bf16
    run = os.path.join("out", "clusterseg", "seed3")
    assert bf16[bf16.index("OUTPUT_DIR") + 1] == os.path.join(run, "bfloat16")
    assert bf16[-4:] == [
        "MODEL.WEIGHTS",
        os.path.join(run, "model_final.pth"),
        "MODEL.DESSAM.INFERENCE_DTYPE",
        "bfloat16",
    ]
    assert "DATASETS.TEST" not in cmd  # no TargetB list: the config's test sets
    (tmp_path / "cnseg/domainseg").mkdir(parents=True)
    (tmp_path / "cnseg/domainseg/targetb60.txt").write_text("a.jpg\n")
    cmd = train_command(args, "clusterseg", 3, str(tmp_path))
    tests = cmd[cmd.index("DATASETS.TEST") + 1]
    assert tests == repr(
        (
            "cnseg_clusterseg_test",
            "cnseg_domainseg_targeta_test",
            "cnseg_domainseg_targetb60_test",
            "isbi2014_test",
        )
    )
    assert "DATASETS.TEST" not in train_command(args, "patchseg", 3, str(tmp_path))


def test_a_bad_targetb_list_stops_before_any_training(sources, tmp_path, capsys):
    (tmp_path / "list.txt").write_text("targetb_0.jpg\nnope.jpg\n")
    argv = _argv(sources, tmp_path, "--targetb-list", str(tmp_path / "list.txt"))
    with pytest.raises(SystemExit):
        run_cli(main, argv + TINY)
    err = capsys.readouterr().err.splitlines()[-1]  # after the converters' progress bars
    assert err.startswith("error: data set 'cnseg_domainseg_targetb60_test': 1 of the 2 names")
    assert "nope.jpg" in err
    assert not (tmp_path / "runs" / "patchseg").exists()


def test_bfloat16_rows_stand_next_to_float32(tmp_path):
    """--bf16 results (results_bfloat16.json) get their own rows; the values are the files'."""

    def results(dice, release_dice):
        entry = {"Dice": dice, "AJI": 50.0, "PQ": 40.0, "images": 3, "score_thresh": 0.55}
        entry["release"] = {"Dice": release_dice, "AJI": 51.0, "PQ": 41.0}
        return {"test_sets": {"cnseg_patchseg_test": entry}}

    run = tmp_path / "patchseg" / "seed1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results(80.0, 81.0)))
    md = write_tables(str(tmp_path), [1])
    assert "bfloat16 inference |" not in md
    (run / "results_bfloat16.json").write_text(json.dumps(results(79.5, 80.25)))
    md = write_tables(str(tmp_path), [1])
    table1 = md.split("## Table 2")[0].splitlines()
    rows = [line.split(" | ") for line in table1 if line.startswith("| DES-SAM")]
    lines = {row[0][2:]: row[1] for row in rows}
    assert lines["DES-SAM (this code)"] == "80.00 ± 0.00"
    assert lines["DES-SAM (this code), release protocol"] == "81.00 ± 0.00"
    assert lines["DES-SAM (this code), bfloat16 inference"] == "79.50 ± 0.00"
    assert lines["DES-SAM (this code), bfloat16, release protocol"] == "80.25 ± 0.00"
    t1 = _csv(tmp_path / "table1.csv")
    assert [row[1] for row in t1 if row[0].endswith("seed 1")] == [
        "80.00",
        "81.00",
        "79.50",
        "80.25",
    ]
