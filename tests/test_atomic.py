"""The atomic writer: the new content under ``path``, flushed to disk (the file before the rename, the folder
after it), and the previous file with no temporary file left when the writer fails."""

import os
import stat

import pytest

from medflare.common import atomic
from medflare.common.atomic import atomic_write


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.txt"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        events.append(("fsync", "dir" if stat.S_ISDIR(mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write(str(path), lambda f: f.write("new"), text=True)

    assert path.read_text() == "new"
    assert events[0] == ("fsync", "file")
    assert events[1] == ("replace", "out.txt")
    if os.name == "posix":  # a folder can be opened and fsynced there
        assert events[2:] == [("fsync", "dir")]
    assert os.listdir(path.parent) == ["out.txt"]


def test_a_failing_writer_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
