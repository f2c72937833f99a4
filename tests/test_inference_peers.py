"""Two gloo processes share a slide and one fails: the other stops soon with its error, exits
non-zero, and the finished tiles give the files of one process when the run is resumed."""

import os
import socket
import subprocess
import sys
import time

import cv2
import pytest
from test_inference_slides_run import predictor

from dessam_d2.data.synthetic.slide import read_level0, write_synthetic_slide
from dessam_d2.inference.images import predict_images
from dessam_d2.inference.slides import predict_slide, slide_output_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of two (rank, port, slide, output folder, "kill" or "raise"): process 1 fails at
# its second tile, SIGKILLed or by an exception; process 0 prints when and how it stopped.
RANK = """
import os, signal, sys, time
import torch.distributed as dist
from test_inference_slides_run import predictor
from dessam_d2.errors import RunFailedError
from dessam_d2.inference import peers
from dessam_d2.inference.images import predict_images
from dessam_d2.inference.slides import predict_slides

rank, port, slide, out, how = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
peers.SILENT_SECONDS = 3.0
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
p = predictor()
if rank == 1:
    forward = p.model.forward
    def failing(inputs):
        if p.model.calls == 1:
            print(f"failing at {time.time()}", flush=True)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError("No space left on device")
        return forward(inputs)
    p.model.forward = failing
try:
    if os.path.isdir(slide):  # a folder of images
        images = sorted(os.path.join(slide, name) for name in os.listdir(slide))
        predict_images(p, images, out, progress=False, rank=rank, world_size=2)
    else:
        predict_slides(p, [slide], out, progress=False, rank=rank, world_size=2)
except RunFailedError as e:
    print(f"stopped at {time.time()}: {e}", flush=True)
    sys.exit(e.exit_code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(tmp_path, slide, out, how):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}/tests:{ROOT}")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port, slide, str(out), how],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    return [(p.wait(timeout=120), *p.communicate()) for p in procs]


def stop_time(stdout, word):
    line = next(line for line in stdout.splitlines() if line.startswith(word))
    return float(line.split()[2].rstrip(":"))


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_failed_process_stops_the_other_and_the_run_resumes(tmp_path, how):
    slide = str(tmp_path / "cyto.tif")
    write_synthetic_slide(slide, (512, 512), seed=2, mpp=0.25)
    one, two = tmp_path / "one", tmp_path / "two"
    predict_slide(predictor(), slide, str(one), progress=False)

    start = time.time()
    (status0, out0, err0), (status1, out1, err1) = run_two(tmp_path, slide, two, how)
    assert time.time() - start < 60
    assert status0 == 1 and status1 != 0, (out0, err0[-2000:], out1, err1[-2000:])
    failed, stopped = stop_time(out1, "failing"), stop_time(out0, "stopped")
    assert 0 < stopped - failed < (15 if how == "kill" else 5)  # SILENT_SECONDS 3 in the test
    if how == "kill":
        assert "process 1 of 2 stopped answering" in out0
    else:
        assert "process 1 of 2 failed: OSError: No space left on device" in out0
    assert "run the same command again" in out0
    tiles = slide_output_paths(str(two), slide)["tiles"]
    assert any(name.endswith(".npz") for name in os.listdir(tiles))  # kept for the resume

    rest = predictor()
    predict_slide(rest, slide, str(two), progress=False)
    for name in ("cyto.geojson", "cyto_nuclei.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_failed_process_stops_the_other_on_images_and_the_run_resumes(tmp_path):
    """The same watch for a folder of images: process 1 fails on its first image, process 0
    stops with its error (at the latest at the barrier before the COCO file), the images done
    stay done and a second run gives the one-process files."""
    folder = tmp_path / "images"
    folder.mkdir()
    slide = str(tmp_path / "cyto.tif")
    write_synthetic_slide(slide, (512, 512), seed=3, mpp=0.25)
    level0 = read_level0(slide)
    for i in range(6):
        y, x = divmod(i, 3)
        cv2.imwrite(
            str(folder / f"img{i}.png"),
            level0[y * 256 : y * 256 + 256, x * 160 : x * 160 + 160, ::-1],
        )
    images = sorted(str(folder / name) for name in os.listdir(folder))
    one, two = tmp_path / "one", tmp_path / "two"
    predict_images(predictor(), images, str(one), progress=False)

    start = time.time()
    (status0, out0, err0), (status1, out1, err1) = run_two(tmp_path, str(folder), two, "raise")
    assert time.time() - start < 60
    assert status0 == 1 and status1 != 0, (out0, err0[-2000:], out1, err1[-2000:])
    assert "process 1 of 2 failed: OSError: No space left on device" in out0
    assert not (two / "predictions_coco.json").exists()

    predict_images(predictor(), images, str(two), progress=False)
    assert len(os.listdir(one)) > len(images)  # every image's files and the COCO file
    for name in sorted(os.listdir(one)):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
