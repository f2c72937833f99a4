"""The one file writer (utils/io.py): whole or nothing, one permission rule, stale temp cleanup."""

import json
import os
import stat

import pytest

from dessam_d2.utils.io import (
    TEMP_SUFFIX,
    atomic_copy,
    atomic_open,
    atomic_write_json,
    remove_stale_temp_files,
)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(str(path), {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "w") as f:
            f.write('{"v": 2')  # half a file, then a crash
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(path.parent) == ["a.json"]


def test_every_file_gets_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "x.json"), [1, 2])
        assert _mode(tmp_path / "x.json") == 0o644  # not mkstemp's 0600
        os.umask(0o077)
        with atomic_open(str(tmp_path / "y.bin")) as f:
            f.write(b"\0")
        assert _mode(tmp_path / "y.bin") == 0o600
    finally:
        os.umask(old)


def test_copy_and_hard_link(tmp_path):
    src = tmp_path / "src.png"
    src.write_bytes(b"png")
    assert atomic_copy(str(src), str(tmp_path / "out" / "copy.png")) is False
    assert atomic_copy(str(src), str(tmp_path / "out" / "link.png"), link=True) is True
    assert os.stat(tmp_path / "out" / "link.png").st_ino == os.stat(src).st_ino
    assert (tmp_path / "out" / "copy.png").read_bytes() == b"png"
    assert sorted(os.listdir(tmp_path / "out")) == ["copy.png", "link.png"]


def test_stale_temporaries_are_removed_young_ones_kept(tmp_path):
    old, young = tmp_path / f".a.pth.1{TEMP_SUFFIX}", tmp_path / f".b.pth.2{TEMP_SUFFIX}"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    os.utime(old, (1, 1))
    pattern = str(tmp_path / f".*{TEMP_SUFFIX}")
    assert remove_stale_temp_files(pattern, older_than_s=3600) == [str(old)]
    assert young.exists()


def test_only_new_files_are_written():
    with pytest.raises(ValueError, match="mode"):
        with atomic_open("x", "a"):
            pass
