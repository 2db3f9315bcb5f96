"""Atomic writes: temp file in the same folder, fsync, rename. A crash leaves the old file or the new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse O_RDONLY on dirs
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_exclusive(tmp: str, path: Path, data: bytes, private: bool) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists (FileExistsError), then drop ``tmp``.

    A hard link does it atomically. Filesystems without hard links (FAT, some network mounts) get an O_EXCL create
    of ``path`` instead: still never two winners, but a crash mid-write can leave a short file there, which readers
    of a token refuse by its length.
    """
    try:
        os.link(tmp, path)  # fails if ``path`` exists, where rename would replace it
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, *, private: bool = False, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: readable as the umask allows, or only by the owner when ``private``
    (a token). ``exclusive`` never replaces a file already there (FileExistsError): two processes creating the same
    secret at once keep the first one's."""
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o666 & ~_umask())  # mkstemp makes 0600 files; a bundle is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_exclusive(tmp, path, data, private)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, *, private: bool = False, exclusive: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``write_bytes``' options)."""
    write_bytes(path, text.encode("utf-8"), private=private, exclusive=exclusive)


@contextlib.contextmanager
def building_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final``, on error remove it.

    Nothing appears at ``final`` unless the whole build succeeded.
    """
    final = Path(os.fspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
