"""Atomic writes: content, no temp files left behind, and the permissions a plain open() would give."""

import os
import stat
from contextlib import contextmanager

import pytest

from conceptfix.artifacts import atomic_write_bytes, current_umask, default_file_mode, write_json


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_the_process_umask():
    for value in (0o022, 0o027, 0o002):
        with umask(value):
            assert current_umask() == value
            assert default_file_mode() == 0o666 & ~value


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_new_file_gets_umask_mode_like_open(tmp_path, mask):
    with umask(mask):
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        with open(tmp_path / "plain.json", "wb") as fh:
            fh.write(b"{}")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain.json") == 0o666 & ~mask
    assert (tmp_path / "a.json").read_bytes() == b"{}"


def test_rewrite_keeps_existing_mode_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "result.json"
    with umask(0o022):
        write_json(path, {"a": 1})
        os.chmod(path, 0o600)  # a user who restricted the file keeps it restricted across rewrites
        write_json(path, {"a": 2})
        assert _mode(path) == 0o600
        os.chmod(path, 0o664)
        write_json(path, {"a": 3})
        assert _mode(path) == 0o664
    assert path.read_text() == '{\n  "a": 3\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_failed_write_removes_temp_file_and_keeps_old_content(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # type: ignore[arg-type]  # the write itself fails
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
