"""One it3d process per trial dir: ``<trial>/run.lock``.

The lock is an exclusive ``flock`` on ``run.lock`` held for the whole run; the file names the
holder (pid, host, start time, command). A second process stops with one line naming that pid.
The kernel drops the lock when its process dies (even by kill -9), so a lock file left by a
dead process is stale: the next run says so and takes it over. On file systems without
``flock`` the pid written in the file decides (alive on this host = held).
On release the file is emptied; a trial dir that holds nothing but the lock is removed again.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
from typing import List, Optional

from .errors import It3dError
from .layout import LOCK

log = logging.getLogger("it3d")
LOCK_NAME = LOCK

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


class TrialLock:
    """``with TrialLock(trial_dir): ...`` -- held for the duration of the block."""

    def __init__(self, trial_dir: str) -> None:
        self.trial_dir = os.path.abspath(trial_dir)
        self.path = os.path.join(self.trial_dir, LOCK_NAME)
        self.fd: Optional[int] = None
        self.created: List[str] = []

    def __enter__(self) -> "TrialLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_dirs(self) -> None:
        d = self.trial_dir
        while d and not os.path.isdir(d):
            self.created.append(d)
            d = os.path.dirname(d)
        os.makedirs(self.trial_dir, exist_ok=True)

    def acquire(self) -> None:
        self._make_dirs()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            held = self._try_lock(fd)
            info = _read(fd)
            if held is None:  # no flock on this file system: a live process on this host named in the file holds it
                pid = info.get("pid")
                held = isinstance(pid, int) and pid != os.getpid() and _alive(pid) \
                    and info.get("host") in (None, socket.gethostname())
            if held:
                pid = info.get("pid", "?")
                raise It3dError(f"trial dir {self.trial_dir} is in use by process {pid}{self._where(info)}: wait for "
                                f"it to finish, or stop it (kill {pid})")
        except BaseException:
            os.close(fd)
            self._remove_if_empty()
            raise
        if info.get("pid") and info.get("pid") != os.getpid():  # a clean exit empties the file: this one died
            log.warning(f"{self.path}: process {info['pid']}{self._where(info)} is no longer running; "
                        f"taking over its stale lock")
        self.fd = fd
        self._write({"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)})

    @staticmethod
    def _try_lock(fd: int) -> Optional[bool]:
        """True: another process holds the lock; False: now we do; None: this file system has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return True
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        return False

    @staticmethod
    def _where(info: dict) -> str:
        parts = []
        if info.get("host") and info["host"] != socket.gethostname():
            parts.append(f"on {info['host']}")
        if info.get("started"):
            parts.append(f"since {info['started']}")
        return f" ({', '.join(parts)})" if parts else ""

    def _write(self, info: dict) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, (json.dumps(info) + "\n").encode("utf-8"))
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds the trial
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None
            self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        """A run that wrote nothing leaves no trial dir behind (only the folders it created itself)."""
        try:
            if os.listdir(self.trial_dir) == [LOCK_NAME] and os.path.getsize(self.path) == 0:
                os.remove(self.path)
            for d in self.created:  # deepest first
                os.rmdir(d)
        except OSError:
            pass
