"""Atomic writes: a crash leaves the old file or the new one, secrets are the owner's alone, and an exclusive write
never replaces what is there."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from edgepeft import atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_private_write_is_readable_by_the_owner_only(tmp_path):
    atomic.write_text(tmp_path / "token", "secret\n", private=True)
    assert _mode(tmp_path / "token") == 0o600


def test_a_shared_write_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "bundle", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "bundle") == 0o644


def test_an_exclusive_write_keeps_the_file_already_there_and_leaves_no_temp_file(tmp_path):
    atomic.write_text(tmp_path / "token", "first\n", private=True, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic.write_text(tmp_path / "token", "second\n", private=True, exclusive=True)
    assert (tmp_path / "token").read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_an_exclusive_write_works_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # what FAT answers

    monkeypatch.setattr(atomic.os, "link", no_links)
    atomic.write_text(tmp_path / "token", "first\n", private=True, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic.write_text(tmp_path / "token", "second\n", private=True, exclusive=True)
    assert (tmp_path / "token").read_text() == "first\n"
    assert _mode(tmp_path / "token") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    atomic.write_text(tmp_path / "delta", "old")

    def broken(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "fsync", broken)
    with pytest.raises(OSError, match="disk gone"):
        atomic.write_text(tmp_path / "delta", "new")
    assert (tmp_path / "delta").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]
