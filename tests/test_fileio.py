"""Atomic writes: complete results or none, and the previous result survives a failure."""

from __future__ import annotations

import os

import pytest

from lorafit import fileio
from lorafit.fileio import atomic_directory, write_json_atomic


def test_directory_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_inside_the_block_keeps_the_old_result(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("crash while writing")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_final_rename_puts_the_old_result_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError), atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert (target / "a.txt").read_text() == "one"


def test_json_is_sorted_and_indented(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "c.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_results_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "c.json", {})
        with atomic_directory(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_atomic_file_keeps_the_old_file_on_error_and_fsyncs_the_new_one(tmp_path, monkeypatch):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with fileio.atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not visible under the final name before the block ends
    assert target.read_bytes() == b"new" and synced
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_directory_contents_and_rename_reach_the_disk(tmp_path, monkeypatch):
    """Every file and folder written inside is fsynced before the rename, the parent folder after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", (info.st_dev, info.st_ino)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a" * 100)
        (tmp / "b.txt").write_text("b")
    def inode(path):
        return os.stat(path).st_dev, os.stat(path).st_ino

    rename = events.index(("replace", str(target)))
    before = {key for kind, key in events[:rename] if kind == "fsync"}
    after = {key for kind, key in events[rename:] if kind == "fsync"}
    assert {inode(target / "sub" / "a.bin"), inode(target / "b.txt"), inode(target / "sub"), inode(target)} <= before
    assert inode(tmp_path) in after
