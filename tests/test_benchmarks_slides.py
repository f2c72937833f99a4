"""benchmarks/slides.py --writer-only: the label TIFF writer alone, in a process of its own."""

import json

from benchmarks import slides


def test_writer_only_writes_every_nucleus(tmp_path, capsys):
    """--writer-only on a 1024-px slide (one prediction tile of 16 x 16 discs): the JSON line
    counts 256 ids, and the label TIFF holds exactly ids 1..256."""
    import tifffile

    assert slides.main(["--writer-only", "--sizes", "1024", "--work", str(tmp_path)]) == 0
    (result,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["writer"]
    assert result["label_tiff_px"] == "1024x1024" and result["ids"] == 256
    assert result["peak_rss_mb"] > 0 and result["seconds"] > 0
    labels = tifffile.imread(tmp_path / "labels_1024.tif", level=0)
    assert labels.shape == (1024, 1024)
    assert sorted(set(labels.ravel().tolist())) == list(range(257))
