"""predict.py in several processes (Detectron2's launch, gloo on the CPU): the files one writes."""

import csv
import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import SMALL
from test_inference_slides_run import predictor

from dessam_d2.data.synthetic.cytology import render_synthetic_image
from dessam_d2.data.synthetic.slide import write_synthetic_slide
from dessam_d2.inference.slides import predict_slide, slide_output_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIDE_FILES = ("cyto.geojson", "cyto_nuclei.csv", "cyto_labels.ome.tif")


def test_shared_tiles_resume_and_assemble_to_the_one_process_files(tmp_path):
    """Process 0 and 1 of 2, run here one after the other (no torch.distributed: its barriers
    are no-ops): process 0 is killed at its first tile, process 1 predicts its share, process 0
    runs again, predicts only its own share and writes what one process writes."""
    slide = str(tmp_path / "cyto.tif")
    write_synthetic_slide(slide, (512, 768), seed=5, mpp=0.25)
    one, two = tmp_path / "one", tmp_path / "two"
    single = predictor()
    predict_slide(single, slide, str(one), progress=False, label_tiff=True)

    kw = dict(progress=False, label_tiff=True)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(predictor(fail_at=1), slide, str(two), rank=0, world_size=2, **kw)
    rank1 = predictor()
    predicted1, background, nuclei1 = predict_slide(
        rank1, slide, str(two), rank=1, world_size=2, **kw
    )
    assert nuclei1 == 0 and not (two / "cyto_nuclei.csv").exists()
    rank0 = predictor()
    predicted0, _, nuclei = predict_slide(rank0, slide, str(two), rank=0, world_size=2, **kw)
    assert predicted0 + predicted1 == single.model.calls and abs(predicted0 - predicted1) <= 1
    assert rank0.model.calls == predicted0  # assembling predicted nothing again
    assert nuclei > 20 and background > 0
    for name in SLIDE_FILES:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not os.path.exists(slide_output_paths(str(two), slide)["tiles"])


def test_one_process_finishes_what_two_left(tmp_path):
    """Process 1 of 2 finished its tiles, process 0 was killed: a run of one process predicts
    only the tiles without a file, and writes the same files."""
    slide = str(tmp_path / "cyto.tif")
    write_synthetic_slide(slide, (512, 512), seed=2, mpp=0.25)
    one, two = tmp_path / "one", tmp_path / "two"
    single = predictor()
    predict_slide(single, slide, str(one), progress=False, label_tiff=True)
    kw = dict(progress=False, label_tiff=True)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(predictor(fail_at=1), slide, str(two), rank=0, world_size=2, **kw)
    done, _, _ = predict_slide(predictor(), slide, str(two), rank=1, world_size=2, **kw)
    rest = predictor()
    predict_slide(rest, slide, str(two), progress=False, label_tiff=True)
    assert rest.model.calls == single.model.calls - done
    for name in SLIDE_FILES:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not os.path.exists(slide_output_paths(str(two), slide)["tiles"])


def load_tool():
    spec = importlib.util.spec_from_file_location("predict_tool", f"{ROOT}/tools/predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_write_the_files_of_one(tmp_path, one_thread):
    """tools/predict.py --num-gpus 2 on the CPU (2 gloo processes, 1 thread each) on 3 images
    and a slide: every output file byte for byte as one process writes it."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        image, _ = render_synthetic_image(np.random.default_rng(i), (100, 120), (3, 6))
        cv2.imwrite(str(inputs / f"img{i}.png"), image[..., ::-1])
    write_synthetic_slide(str(inputs / "cyto.tif"), (512, 512), seed=3, mpp=0.5)
    args = ["--config-file", f"{ROOT}/configs/dessam_demo.yaml", "--random-weights"]
    args += ["--input", str(inputs), "--level", "1", "--tile-size", "128", "--tile-overlap", "32"]
    args += ["--label-tiff"]
    # random masks cover a few percent of a tile: nuclei to number and to outline
    opts = SMALL + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.DESSAM.MASK_LOGIT_THRESHOLD"]
    opts += ["0.06"]
    one, two = tmp_path / "one", tmp_path / "two"

    tool = load_tool()
    assert tool.main(tool.parse_args(args + ["--output", str(one)] + opts)) == 0
    cmd = [sys.executable, "tools/predict.py"] + args + ["--output", str(two), "--num-gpus", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DESSAM_MALLOC_TUNING="0")
    proc = subprocess.run(
        cmd + opts, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("outputs in") == 2  # slides, then images: process 0 alone prints

    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(two)) and len(names) == 3 * 4 + 3 + 2
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    for csv_file in ("cyto_nuclei.csv", "img0_nuclei.csv"):
        assert list(csv.DictReader(open(one / csv_file))), csv_file  # something was found
