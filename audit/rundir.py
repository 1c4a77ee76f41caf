"""Run folders: one process at a time, and a finished run is only ever replaced by a finished run.

    with RunFolder(Path("runs") / "default", resume=False, overwrite=True) as rf:
        ...write the run into rf.work...
        rf.commit()          # --overwrite: only now does the new run take the old one's place

``<out>/.<name>.lock`` holds the pid and host of the process working on ``<out>/<name>``; a second process is
refused while that process lives, and the lock of a dead process (killed, crashed) is taken over. With
``overwrite`` the new run is built in ``<out>/.<name>.new`` and swapped in by ``commit``; a failure leaves
the old run as it was, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from underfire.audit.config import AuditError


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written (before anything is loaded); creates nothing."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise AuditError(f"cannot write the run under {out}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise AuditError(f"cannot write the run under {out}: {probe} is not writable ({exc.strerror})") from None


class RunLock:
    """An exclusive lock file beside the run folder (it survives the folder being swapped)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise AuditError(
                        f"run {self.run_dir} is in use by process {holder['pid']} on {holder['host']} (since "
                        f"{holder.get('since', '?')}): wait for it or stop it; if that process is gone, delete "
                        f"{self.path}") from None
                self.path.unlink(missing_ok=True)  # stale: the process that held it is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise AuditError(f"could not take the lock {self.path}: another process keeps taking it")

    def _holder(self) -> dict | None:
        try:
            h = json.loads(self.path.read_text())
            return h if isinstance(h, dict) and isinstance(h.get("pid"), int) else None
        except (OSError, json.JSONDecodeError):
            # being written by its owner right now, or garbage: young means the former
            try:
                return {"pid": -1, "host": "?"} if time.time() - self.path.stat().st_mtime < 5 else None
            except OSError:
                return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder["host"] != socket.gethostname():
            return True  # a process on another machine: its liveness cannot be told from here
        if holder["pid"] <= 0:
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class RunFolder:
    """The folder a run works in, locked; see the module docstring."""

    def __init__(self, run_dir: Path, resume: bool, overwrite: bool, lock: bool = True) -> None:
        """``lock=False``: a process that only works in a folder another process (torchrun rank 0) set up."""
        self.run_dir = run_dir
        self.resume, self.overwrite = resume, overwrite
        self.lock = RunLock(run_dir) if lock else None
        staged = overwrite and not resume and run_dir.exists()
        self.work = run_dir.parent / f".{run_dir.name}.new" if staged else run_dir
        self.created_out = not run_dir.parent.exists()
        self.committed = False

    def __enter__(self) -> "RunFolder":
        if self.lock is None:
            return self  # another rank of a torchrun job: rank 0 prepares (and locks) the folder
        self.lock.acquire()
        try:
            self._prepare()
        except BaseException:
            self.lock.release()
            self._cleanup_out()
            raise
        return self

    def _prepare(self) -> None:
        d = self.run_dir
        if self.resume:
            if not (d / "config.json").is_file():
                raise AuditError(f"nothing to resume: {d} holds no run (start it without --resume)")
            return
        if d.exists() and any(d.iterdir()) and not self.overwrite:
            raise AuditError(f"run folder {d} already holds a run: pass --resume to continue it, --overwrite "
                             f"to replace it, or choose another --name")
        if self.work != d and self.lock is not None:
            shutil.rmtree(self.work, ignore_errors=True)  # a dead earlier --overwrite's leftovers (we hold the lock)
        self.work.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """Put the finished run in place: with --overwrite, swap it for the old one."""
        if self.work != self.run_dir:
            old = self.run_dir.parent / f".{self.run_dir.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.run_dir, old)
            os.rename(self.work, self.run_dir)
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.lock is not None:
                if self.work != self.run_dir:
                    shutil.rmtree(self.work, ignore_errors=True)  # the old run stays as it was
                elif not self.resume and not any(self.work.rglob("batch_*.json")):
                    shutil.rmtree(self.work, ignore_errors=True)  # failed before any result: leave nothing
        finally:
            if self.lock is not None:
                self.lock.release()
            if exc_type is not None:
                self._cleanup_out()

    def _cleanup_out(self) -> None:
        out = self.run_dir.parent
        if self.created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
