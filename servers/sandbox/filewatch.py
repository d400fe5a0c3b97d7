"""Which workspace files one sandbox call created or modified.

``FileTracker.begin()`` before the call and ``.end()`` after it return workspace-relative paths of
regular files written in between. On Linux it uses inotify (cost independent of how many files the
workspace holds); where inotify is unavailable, or its queue overflowed, it compares two directory
walks (mtime + size of every file). Symlinks are never reported.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import time
from pathlib import Path

log = logging.getLogger("cytoagent.sandbox")

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
_MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
         | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")
MAX_WATCHED_DIRS = 20_000

IGNORED_DIRS = {".index"}  # the workspace's artifact index (servers.common.workspace.INDEX_DIR)


def _ignored(rel: str) -> bool:
    return rel.split("/", 1)[0] in IGNORED_DIRS


def snapshot(root: Path, limit: int = 500_000) -> dict[str, tuple[int, int]]:
    """Regular files under root (symlinks not followed) → (mtime_ns, size)."""
    out: dict[str, tuple[int, int]] = {}
    stack = [(str(root), "")]
    while stack:
        d, prefix = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        if _ignored(prefix + e.name):
                            continue
                        stack.append((e.path, prefix + e.name + "/"))
                    elif e.is_file(follow_symlinks=False):
                        rel = prefix + e.name
                        if _ignored(rel):
                            continue
                        st = e.stat(follow_symlinks=False)
                        out[rel] = (st.st_mtime_ns, st.st_size)
                        if len(out) >= limit:
                            return out
                except OSError:
                    continue
    return out


def _is_regular(p: str) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


class _Inotify:
    def __init__(self, root: Path):
        self.root = str(root)
        self.libc = ctypes.CDLL(None, use_errno=True)
        fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        self.wd: dict[int, str] = {}  # watch descriptor → relative dir ("" = root)
        self.overflow = False
        self._watch_tree("")

    def _add(self, rel: str) -> bool:
        if len(self.wd) >= MAX_WATCHED_DIRS:
            self.overflow = True
            return False
        path = os.path.join(self.root, rel) if rel else self.root
        wd = self.libc.inotify_add_watch(self.fd, path.encode(), _MASK)
        if wd < 0:
            return False
        self.wd[wd] = rel
        return True

    def _watch_tree(self, rel: str, found: set[str] | None = None) -> None:
        """Watch rel and every directory below it; with ``found``, collect the files already there."""
        stack = [rel]
        while stack:
            r = stack.pop()
            if not self._add(r):
                continue
            try:
                it = os.scandir(os.path.join(self.root, r) if r else self.root)
            except OSError:
                continue
            with it:
                for e in it:
                    sub = f"{r}/{e.name}" if r else e.name
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(sub)
                        elif found is not None and e.is_file(follow_symlinks=False):
                            found.add(sub)
                    except OSError:
                        continue

    def drain(self) -> set[str]:
        """Paths of files touched since the last drain (may include deleted ones)."""
        touched: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                self.overflow = True
                break
            if not buf:
                break
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, ln = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size: off + _EVENT.size + ln].split(b"\0", 1)[0].decode(errors="surrogateescape")
                off += _EVENT.size + ln
                if mask & IN_Q_OVERFLOW:
                    self.overflow = True
                    continue
                if mask & IN_IGNORED:
                    self.wd.pop(wd, None)
                    continue
                base = self.wd.get(wd)
                if base is None or not name:
                    continue
                rel = f"{base}/{name}" if base else name
                if mask & IN_ISDIR:
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        self._watch_tree(rel, touched)  # files may already be in it
                    continue
                if mask & (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE):
                    touched.add(rel)
        return touched

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class FileTracker:
    """Files written in a workspace between ``begin()`` and ``end()``."""

    def __init__(self, root: str | os.PathLike, *, use_inotify: bool = True):
        self.root = Path(root).resolve()
        self._ino: _Inotify | None = None
        if use_inotify:
            try:
                self._ino = _Inotify(self.root)
            except (OSError, AttributeError) as e:
                log.info("sandbox: inotify unavailable (%s); tracking files by directory walks", e)
        self._before: dict[str, tuple[int, int]] | None = None
        self._t0 = 0

    @property
    def mode(self) -> str:
        return "inotify" if self._ino is not None else "walk"

    def begin(self) -> None:
        self._t0 = time.time_ns()
        if self._ino is not None:
            self._ino.drain()  # forget what happened between calls
            if self._ino.overflow:
                self._reset_inotify()
        if self._ino is None:
            self._before = snapshot(self.root)
        else:
            self._before = None

    def _reset_inotify(self) -> None:
        self._ino.close()
        try:
            self._ino = _Inotify(self.root)
        except OSError:
            self._ino = None

    def end(self) -> list[str]:
        if self._ino is not None:
            touched = self._ino.drain()
            if not self._ino.overflow:
                return sorted(p for p in touched if not _ignored(p) and _is_regular(os.path.join(self.root, p)))
            # queue overflow: fall back to "modified since the call began" by walking (with a margin
            # for coarse file-system timestamps)
            self._reset_inotify()
            since = self._t0 - 50_000_000
            return sorted(k for k, (mtime, _) in snapshot(self.root).items() if mtime >= since)
        after = snapshot(self.root)
        before = self._before or {}
        return sorted(k for k, v in after.items() if before.get(k) != v)

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None
