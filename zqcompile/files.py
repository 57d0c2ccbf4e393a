"""Writing user files safely: every target is checked before any long work starts, written to a temporary
file next to it and renamed into place (a failed or interrupted write leaves the old file and no temporary),
and nothing zqcompile did not write is ever replaced or deleted.

`check_output_file` refuses a target that is not a regular file (a directory, a device, a symlink), an
existing file that is not of the kind being written (`replaceable` says which files may be replaced, e.g. an
earlier engine), and a directory that cannot be written. `Staged` collects several outputs of one command
(an engine and its dump) and renames them into place together at the end, so an interrupt leaves nothing.
Every message names the user's path, never a temporary one.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator
from zqcompile.errors import OutputPathError  # noqa: F401 - raised here, defined there

TMP_PREFIX = ".zq-"


def looks_like_onnx(path: str) -> bool:
    """An ONNX model file (a ModelProto starts with field 1, ir_version: byte 0x08)."""
    try:
        with open(path, "rb") as f:
            return path.endswith(".onnx") and f.read(1) == b"\x08"
    except OSError:
        return False


def looks_like_figure(path: str) -> bool:
    """A PNG (its 8-byte signature) or an SVG (an XML text mentioning <svg)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") or b"<svg" in head


def looks_like_json(path: str) -> bool:
    import json
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def write_json_atomic(path: str | os.PathLike, data, what: str = "JSON results") -> None:
    """json.dumps(data) to `path` atomically; an existing JSON file there is replaced, anything else refused."""
    import json
    text = json.dumps(data, indent=1)
    with atomic_file(path, what, replaceable=looks_like_json, kind="a JSON file") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def check_output_file(path: str | os.PathLike, what: str = "file",
                      replaceable: Callable[[str], bool] | None = None, kind: str | None = None) -> str:
    """The target's absolute path, or OutputPathError saying why it cannot be written and what to do.
    An existing regular file is replaced only when `replaceable(path)` says it is `kind` (e.g. an engine)."""
    p = os.fspath(path)
    if not p:
        raise OutputPathError(f"cannot write the {what}: empty path")
    full = os.path.abspath(p)
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputPathError(f"cannot write the {what} to {p!r}: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"cannot write the {what} to {p!r}: it is a directory; give a file name "
                                  f"(a path inside it, or another one)")
        if stat.S_ISLNK(st.st_mode):
            raise OutputPathError(f"cannot write the {what} to {p!r}: it is a symbolic link; give the real path")
        if not stat.S_ISREG(st.st_mode):
            raise OutputPathError(f"cannot write the {what} to {p!r}: it exists and is not a regular file")
        if replaceable is None or not replaceable(full):
            raise OutputPathError(f"cannot write the {what} to {p!r}: a file that is not {kind or 'a zqcompile ' + what} "
                                  f"is there; remove it or choose another path")
    check_writable_dir(os.path.dirname(full), p, what)
    return full


def check_output_dir(path: str | os.PathLike, what: str = "folder") -> str:
    """The absolute path of a folder to write whole (a checkpoint), or OutputPathError: it must be new or an empty
    directory; a file, a symlink or a folder with anything in it is never written into or replaced."""
    p = os.fspath(path)
    if not p:
        raise OutputPathError(f"cannot write the {what}: empty path")
    full = os.path.abspath(p)
    if os.path.islink(full):
        raise OutputPathError(f"cannot write the {what} to {p!r}: it is a symbolic link; give the real path")
    if os.path.lexists(full):
        if not os.path.isdir(full):
            raise OutputPathError(f"cannot write the {what} to {p!r}: a file is there; remove it or choose another "
                                  f"path")
        if os.listdir(full):
            raise OutputPathError(f"cannot write the {what} to {p!r}: the folder is not empty; give a new or empty "
                                  f"folder (nothing in an existing folder is replaced)")
    check_writable_dir(os.path.dirname(full), p, what)
    return full


@contextmanager
def atomic_dir(path: str | os.PathLike, what: str = "folder") -> Iterator[str]:
    """Yield a temporary folder next to `path` (checked by check_output_dir); on success it is renamed onto
    `path`, on any failure (or Ctrl-C) removed with everything in it, so no half-written folder is left."""
    target = check_output_dir(path, what)
    try:
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, suffix=".tmp", dir=os.path.dirname(target))
    except OSError as e:
        raise OutputPathError(f"cannot write the {what} to {os.fspath(path)!r}: {e.strerror}") from None
    with _placed_or_removed(tmp, what, path):
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700, and some writers (safetensors) make files 0600
        for name in os.listdir(tmp):
            f = os.path.join(tmp, name)
            if os.path.isfile(f):
                os.chmod(f, 0o666 & ~mask)
                _fsync(f)
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        os.replace(tmp, target)


def check_writable_dir(d: str, user_path: str, what: str) -> None:
    """Create and remove a probe file in `d` (os.access is not enough: /proc, read-only mounts, root)."""
    if not os.path.isdir(d):
        raise OutputPathError(f"cannot write the {what} to {user_path!r}: directory {d!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".probe", dir=d)
    except OSError as e:
        raise OutputPathError(f"cannot write the {what} to {user_path!r}: directory {d!r} is not writable "
                              f"({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "file", replaceable: Callable[[str], bool] | None = None,
                kind: str | None = None, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path next to `path` (ending in `suffix`, for writers that go by the extension); on
    success it is fsynced and renamed onto `path`, on any failure (or Ctrl-C) removed. OSErrors name the
    user's path."""
    target = check_output_file(path, what, replaceable, kind)
    tmp = _temp_path(target, what, path, suffix)
    with _placed_or_removed(tmp, what, path):
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)


@contextmanager
def _placed_or_removed(tmp: str, what: str, user_path) -> Iterator[None]:
    """Around writing `tmp` and renaming it into place: an OSError names the user's path, and `tmp` is removed
    whatever happens (after the rename there is nothing left to remove)."""
    try:
        yield
    except OSError as e:
        raise OutputPathError(f"cannot write the {what} to {os.fspath(user_path)!r}: {e.strerror or e} "
                              f"(nothing written)") from None
    finally:
        _remove(tmp)


def _temp_path(target: str, what: str, user_path, suffix: str = ".tmp") -> str:
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=os.path.dirname(target))
    except OSError as e:
        raise OutputPathError(f"cannot write the {what} to {os.fspath(user_path)!r}: {e.strerror}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; what we write is as readable as any new file
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


class Staged:
    """Outputs of one command, written to temporaries and put in place together by `commit()`; anything
    not committed (an error, Ctrl-C) is removed by `close()`. Use as a context manager."""

    def __init__(self) -> None:
        self._files: list[tuple[str, str, str, str]] = []  # (tmp, target, user path, what)
        self._actions: list[tuple[Callable[[], None], Callable[[], None]]] = []  # (commit, discard)

    def file(self, path: str | os.PathLike, what: str = "file",
             replaceable: Callable[[str], bool] | None = None, kind: str | None = None) -> str:
        target = check_output_file(path, what, replaceable, kind)
        tmp = _temp_path(target, what, path)
        self._files.append((tmp, target, os.fspath(path), what))
        return tmp

    def action(self, commit: Callable[[], None], discard: Callable[[], None]) -> None:
        """A custom output (e.g. a dump folder) with its own commit and discard steps."""
        self._actions.append((commit, discard))

    def commit(self) -> None:
        for tmp, target, user, what in self._files:
            try:
                _fsync(tmp)
                os.replace(tmp, target)
            except OSError as e:
                raise OutputPathError(f"cannot write the {what} to {user!r}: {e.strerror or e}") from None
        self._files.clear()
        for commit, _ in self._actions:
            commit()
        self._actions.clear()

    def close(self) -> None:
        for tmp, *_ in self._files:
            _remove(tmp)
        for _, discard in self._actions:
            discard()
        self._files.clear()
        self._actions.clear()

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
