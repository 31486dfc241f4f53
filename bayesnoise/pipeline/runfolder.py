"""A run's output folder: checked before any work, locked while a run writes into it.

:func:`prepare` checks that ``--out`` can be a folder this process writes into, and raises
:class:`UsageError` naming it otherwise. :func:`lock` holds ``OUT/.lock`` for the duration of a
run: an advisory ``flock`` on the file, which the operating system releases when the holder
exits in any way (a crash, SIGKILL), and a line in it naming the holder (host, process id, start
time, command). A second run into the same folder fails at once with :class:`LockedError`,
naming the holder. A lock file whose process is gone is taken over with a warning, so rerunning
an interrupted or killed run resumes it. Where ``fcntl`` is missing (Windows), the file is
created exclusively instead, and a lock whose process id no longer runs on this host is stale.

The errors carry the command line's exit status: 2 for a bad argument or config, 1 for a run
that failed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunError", "UsageError", "LockedError", "prepare", "lock"]

_log = logging.getLogger("bayesnoise")

LOCK_NAME = ".lock"


class RunError(Exception):
    """A run that failed (divergence, unreadable data, a refused stage): exit status 1."""

    exit_code = 1


class UsageError(RunError):
    """A bad argument or config value found after the config loaded: exit status 2."""

    exit_code = 2


class LockedError(RunError):
    """Another running process holds the run folder's lock."""


def prepare(out: str | os.PathLike, name: str = "--out", files: tuple[str, ...] = ()) -> Path:
    """Creates the run folder ``out`` if needed and checks that this process can write into it,
    and that none of ``files`` (paths relative to it that the run writes) is a folder.

    Raises:
        UsageError: ``out`` or a folder above it is a file, the folder cannot be created or
            written, or one of ``files`` is a folder (the message names ``name``, the path and
            the reason).
    """
    path = Path(out)
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            where = "is" if above == path else f"is under {above}, which is"
            raise UsageError(f"{name} {str(path)!r} {where} a file; allowed: a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"{name} {str(path)!r}: cannot create the folder ({e.strerror or e}); allowed: a "
            f"folder this user can create and write."
        ) from None
    probe = path / f".write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"{name} {str(path)!r}: cannot write into the folder ({e.strerror or e}); allowed: "
            f"a folder this user can write."
        ) from None
    for file in files:
        target = path / file
        folders = [path / p for p in Path(file).parents if p != Path(".")]
        if target.is_dir() or any(d.exists() and not d.is_dir() for d in folders):
            raise UsageError(
                f"{name} {str(path)!r}: {target} is in the way (a folder where the run writes a "
                f"file, or a file where it needs a folder); allowed: remove it, or give another "
                f"{name}."
            )
    return path


def _holder_text() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv) or "python",
        }
    )


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return (
        f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
        f"{holder.get('command')})"
    )


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: always True for another host or an unreadable file."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(out: Path, path: Path) -> LockedError:
    return LockedError(
        f"the run folder {str(out)!r} is in use by {_describe(_read_holder(path))}: wait for it, "
        f"or give another --out. (If no such run exists, remove {path}.)"
    )


@contextlib.contextmanager
def lock(out: str | os.PathLike) -> Iterator[Path]:
    """Holds the lock of the run folder ``out`` (which must exist) inside the ``with`` block.

    Raises:
        LockedError: another process holds it; the message names the process.
    """
    out = Path(out)
    path = out / LOCK_NAME
    if fcntl is None:  # pragma: no cover - Windows
        with _exclusive_lock(out, path):
            yield path
        return
    fd = _flock(out, path)
    try:
        left = _read_holder(path)
        if left and left.get("pid") != os.getpid():
            _log.warning(
                "the run folder %s was locked by %s, which no longer runs: taking it over",
                out,
                _describe(left),
            )
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode())
        os.fsync(fd)
        try:
            yield path
        finally:
            # unlink before unlocking: a process that opens the name now gets a fresh file
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _flock(out: Path, path: Path) -> int:
    """An open descriptor of ``path`` with an exclusive flock, the file still at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise _locked(out, path) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one


@contextlib.contextmanager
def _exclusive_lock(out: Path, path: Path) -> Iterator[None]:  # pragma: no cover - Windows
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            holder = _read_holder(path)
            if _alive(holder):
                raise _locked(out, path) from None
            _log.warning(
                "the run folder %s was locked by %s, which no longer runs: taking it over",
                out,
                _describe(holder),
            )
            with contextlib.suppress(OSError):
                path.unlink()
    else:
        raise _locked(out, path)
    try:
        os.write(fd, _holder_text().encode())
    finally:
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
