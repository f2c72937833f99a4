"""QuPath GeoJSON exports (rectangles, polygons, points, classes) to COCO boxes
(data/converters/qupath.py), and the tool that needs no torch."""

import json
import os
import subprocess
import sys

import numpy as np
from detectron2.data import DatasetCatalog
from test_data_converters_user_datasets import write_images

from dessam_d2.data.converters.qupath import convert_qupath, features_to_annotations
from dessam_d2.data.converters.user_datasets import register_user_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qupath_rectangle(x, y, w, h, cls="Nucleus"):
    """A rectangle as QuPath 0.4-0.6 exports it: a closed 4-corner Polygon, a uuid, the class
    name and colour."""
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    return {
        "type": "Feature",
        "id": "6c0d1a3e-8f1b-4a57-9a51-0f5e2c9b7d11",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": cls, "color": [0, 0, 255]},
        },
    }


def test_qupath_rectangles_polygons_points_and_classes(tmp_path):
    ellipse = [[50 + 10 * np.cos(t), 40 + 6 * np.sin(t)] for t in np.linspace(0, 2 * np.pi, 33)]
    ellipse[-1] = ellipse[0]
    features = [
        qupath_rectangle(10, 20, 15, 12),
        {  # QuPath 0.2: id "PathAnnotationObject", colorRGB, isLocked, measurements list
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": {"type": "Polygon", "coordinates": [ellipse]},
            "properties": {
                "classification": {"name": "Nucleus", "colorRGB": -16776961},
                "isLocked": False,
                "measurements": [],
            },
        },
        {
            "type": "Feature",
            "id": "0f4d",
            "geometry": {"type": "MultiPoint", "coordinates": [[5, 5], [6, 7]]},
            "properties": {"objectType": "annotation"},
        },
        qupath_rectangle(60, 50, 20, 20, cls="Stroma"),
        qupath_rectangle(120, 5, 30, 10),  # crosses the right border (image is 128 wide)
    ]
    annos, skipped = features_to_annotations(features, 128, 96, classes=["nucleus"])
    assert [a["bbox"] for a in annos] == [
        [10, 20, 15, 12],
        [40.0, 34.0, 20.0, 12.0],
        [120, 5, 8, 10],
    ]
    assert annos[0]["segmentation"] == [] and len(annos[1]["segmentation"][0]) == 64
    assert skipped == {"not an area (MultiPoint)": 1, "other class": 1}

    images = tmp_path / "images"
    write_images(str(images), ["case1/a.png", "b.png"], size=(96, 128))
    (tmp_path / "a.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    (tmp_path / "b.png.geojson").write_text(json.dumps([qupath_rectangle(1, 2, 3, 4)]))
    out = tmp_path / "boxes.json"
    geojson = [str(tmp_path / "b.png.geojson"), str(tmp_path / "a.geojson")]
    report = convert_qupath(geojson, str(images), str(out))
    assert (report.subsets[0].images, report.subsets[0].nuclei) == (2, 5)
    coco = json.loads(out.read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        ("case1/a.png", 128, 96),
        ("b.png", 128, 96),
    ]
    assert len(coco["annotations"]) == 5  # all classes by default, the points skipped
    registered = register_user_datasets([f"own_qupath={out}:{images}"])
    assert registered == {"own_qupath": True}  # the ellipse is an outline
    assert len(DatasetCatalog.get("own_qupath")[0]["annotations"]) == 4

    (tmp_path / "c.geojson").write_text(json.dumps([qupath_rectangle(1, 2, 3, 4)]))
    proc = subprocess.run(
        [sys.executable, "tools/import_qupath.py", "--geojson", str(tmp_path / "c.geojson")]
        + ["--image-root", str(images), "--output", str(tmp_path / "c.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith("error: ") and "c.geojson: no image named c.<" in last
    assert not (tmp_path / "c.json").exists()


def test_the_tool_prints_no_warning(tmp_path):
    """A run that succeeds writes nothing on stderr (torch's FutureWarning about fvcore's
    torch.jit.script included), one that fails only its one-line error."""
    write_images(str(tmp_path), ["b.png"], size=(96, 128))
    (tmp_path / "b.geojson").write_text(json.dumps([qupath_rectangle(1, 2, 3, 4)]))
    (tmp_path / "c.geojson").write_text(json.dumps([qupath_rectangle(1, 2, 3, 4)]))
    stderr = []
    for name in ("b", "c"):
        proc = subprocess.run(
            [
                sys.executable,
                "tools/import_qupath.py",
                "--geojson",
                str(tmp_path / f"{name}.geojson"),
            ]
            + ["--image-root", str(tmp_path), "--output", str(tmp_path / f"{name}.json")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "default"},
        )
        stderr.append(proc.stderr.strip().splitlines())
    assert stderr[0] == [] and (tmp_path / "b.json").is_file()
    assert len(stderr[1]) == 1 and stderr[1][0].startswith("error: ")


def test_the_tool_needs_no_torch(tmp_path):
    """--help and a whole import run load neither torch nor Detectron2 (it needs no model)."""
    write_images(str(tmp_path), ["b.png"], size=(96, 128))
    (tmp_path / "b.geojson").write_text(json.dumps([qupath_rectangle(1, 2, 3, 4)]))
    args = [
        ["--help"],
        ["--geojson", str(tmp_path / "b.geojson"), "--image-root", str(tmp_path)]
        + ["--output", str(tmp_path / "b.json")],
    ]
    code = (
        "import runpy, sys\n"
        f"for args in {args!r}:\n"
        "    sys.argv = ['tools/import_qupath.py'] + args\n"
        "    try:\n"
        "        runpy.run_path('tools/import_qupath.py', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
        "heavy = ('torch', 'detectron2', 'fvcore', 'segment_anything')\n"
        "print('heavy', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = proc.stdout.splitlines()
    assert "usage: import_qupath.py" in proc.stdout and lines.count("exit 0") == 2, proc.stdout
    assert lines[-1] == "heavy []", lines[-1]
    assert len(json.loads((tmp_path / "b.json").read_text())["annotations"]) == 1
