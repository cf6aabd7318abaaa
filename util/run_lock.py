"""One run per run folder at a time: `<folder>/.lock`, created atomically, removed by its owner.

    with RunLock(folder) as lock:            # refuses (RunFolderError) while another live run holds it
        ...

    # torchrun: rank 0 takes the lock, the other ranks join it without creating or deleting it
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    with RunLock(folder, shared_id=run_id, create=(rank == 0)):
        ...

The lock file holds JSON {"pid", "host", "started" (ISO 8601), "shared_id", "argv"} (plus "proc_start",
the holder's start time in clock ticks where /proc has it, which tells a reused pid from the holder).
An existing lock is judged as follows:

- same `shared_id` as ours (not None): it is our run's lock (another rank's, or a restarted rank 0's) and
  is accepted; a rank 0 (create=True) takes over a matching lock whose process is gone;
- held by a live process on this host, or by any process on another host (whose liveness cannot be
  seen from here): `RunFolderError`, one line naming the holder and the fix;
- held by a process of this host that no longer exists: stale; one warning line, then taken over;
- empty or not JSON: another process may be writing it right now, so it is re-read for
  `unreadable_wait_s` seconds; still unreadable, it is treated as stale (one warning line).

`release()` deletes the file only if it is still ours (same pid, host and start time), so a run never
removes a lock that another run has taken over, and a joined (not created) lock is never deleted.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Sequence

from util.errors import RunFolderError

log = logging.getLogger("dcdp.run_lock")

LOCK_NAME = ".lock"


def _proc_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks after boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, proc_start: int | None) -> bool:
    """Whether process `pid` of this host exists and is the one that wrote the lock (if its start time is known)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except OSError:
        return False
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:  # the pid was reused by another process
            return False
    return True


def read_lock(folder: str | os.PathLike) -> dict | None:
    """The lock record of `folder` (a dict), None when there is none; {} when the file is unreadable."""
    try:
        with open(os.path.join(os.fspath(folder), LOCK_NAME)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else {}


class RunLock:
    """The lock of one run folder. Use as a context manager, or call `acquire()` and `release()`.

    Args:
        folder: the run folder (created if missing).
        shared_id: the id the processes of one run share (torchrun: TORCHELASTIC_RUN_ID); a lock with
            the same id is accepted as ours. None: locks are never shared.
        create: False for the processes that join a lock another process of the run creates (torchrun
            ranks other than 0): they wait up to `join_wait_s` for it and never create or delete it.
            Needs a shared_id.
        argv: what the lock records as the command line (default: sys.orig_argv, the interpreter included).
        unreadable_wait_s: how long an empty or malformed lock file is re-read before it is taken over.
        join_wait_s: with create=False, how long to wait for the lock to appear.
        flag: the option that chooses the folder, named in the messages ("--save_dir"; the training
            command's is "--out_dir").

    After `acquire()`: `owned` is True when this process created (or took over) the file and will delete
    it on `release()`; `record` is the lock's JSON record (ours, or the one we joined).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        shared_id: str | None = None,
        *,
        create: bool = True,
        argv: Sequence[str] | None = None,
        unreadable_wait_s: float = 2.0,
        join_wait_s: float = 60.0,
        flag: str = "--save_dir",
    ):
        if not create and shared_id is None:
            raise ValueError("RunLock(create=False) joins a lock of the same run: give its shared_id")
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.shared_id = None if shared_id is None else str(shared_id)
        self.create = create
        self.argv = list((getattr(sys, "orig_argv", None) or sys.argv) if argv is None else argv)
        self.unreadable_wait_s = unreadable_wait_s
        self.join_wait_s = join_wait_s
        self.flag = flag
        self.owned = False
        self.record: dict | None = None
        self._pid: int | None = None  # the process that acquired (a forked child must not release)

    # -- public ---------------------------------------------------------------------------------

    def acquire(self) -> "RunLock":
        if self.record is not None:
            raise RuntimeError(f"RunLock({self.folder!r}) is already acquired")
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(
                f"cannot create run folder '{self.folder}' ({type(exc).__name__}: {exc.strerror or exc}); "
                f"use a writable {self.flag}") from None
        join_deadline = time.monotonic() + self.join_wait_s
        while True:
            if self.create and self._try_create():
                return self
            found = self._read_settled()
            if found is not None:
                record, inode = found
                if not record:  # still unreadable after unreadable_wait_s: a writer that died half-way
                    if self.create:
                        log.warning(f"run folder '{self.folder}': '{self.path}' is empty or not a lock record "
                                    f"after {self.unreadable_wait_s:g} s; treating it as a stale lock and taking it "
                                    f"over")
                        self._remove_if_same(inode)
                        continue
                else:
                    host_here = record.get("host") == socket.gethostname()
                    alive = not host_here or _alive(record["pid"], record.get("proc_start"))
                    ours = self.shared_id is not None and record.get("shared_id") == self.shared_id
                    if ours and (alive or not self.create):
                        self.record, self.owned, self._pid = record, False, os.getpid()
                        return self
                    if alive:
                        raise RunFolderError(self._in_use_message(record))
                    if self.create:  # stale: its process is gone
                        if not ours:
                            log.warning(f"run folder '{self.folder}': taking over the stale lock of pid "
                                        f"{record['pid']} on host {record.get('host')} since {record.get('started')} "
                                        f"(that process no longer exists)")
                        self._remove_if_same(inode)
                        continue
            # a joining process (create=False) waits for its run's creator to create or take over the lock
            if not self.create:
                if time.monotonic() > join_deadline:
                    raise RunFolderError(
                        f"run folder '{self.folder}' has no lock of run {self.shared_id!r} after "
                        f"{self.join_wait_s:g} s; the process that creates it (torchrun rank 0) did not start or "
                        f"has ended; if no run is alive, delete '{self.path}'")
                time.sleep(0.05)

    def release(self) -> None:
        """Delete the lock file if this process created it and it is still ours; otherwise leave it."""
        record, owned, self.record, self.owned = self.record, self.owned, None, False
        if record is None or not owned or self._pid != os.getpid():
            return
        current = read_lock(self.folder)
        if current and all(current.get(k) == record.get(k) for k in ("pid", "host", "started", "token")):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ------------------------------------------------------------------------------

    def _new_record(self) -> dict:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "shared_id": self.shared_id,
            "argv": self.argv,
            "proc_start": _proc_start(pid),
            "token": uuid.uuid4().hex,  # tells our lock from a later one of the same process
        }

    def _try_create(self) -> bool:
        """Create the lock file (O_CREAT | O_EXCL: exactly one process succeeds); False if it exists."""
        record = self._new_record()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise RunFolderError(
                f"cannot create the lock '{self.path}' ({type(exc).__name__}: {exc.strerror or exc}); "
                f"use a writable {self.flag}") from None
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())  # one write: readers see all of it or nothing
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(self.path)
            raise RunFolderError(
                f"cannot write the lock '{self.path}' ({type(exc).__name__}: {exc.strerror or exc}); "
                f"free some space or use another {self.flag}") from None
        os.close(fd)
        self.record, self.owned, self._pid = record, True, record["pid"]
        return True

    def _read_settled(self) -> tuple[dict, int] | None:
        """(record, inode) of the lock file, re-read while it is unreadable (up to unreadable_wait_s);
        record is {} if it stayed unreadable; None if there is no lock file."""
        deadline = time.monotonic() + self.unreadable_wait_s
        while True:
            try:
                with open(self.path) as f:
                    inode = os.fstat(f.fileno()).st_ino
                    text = f.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise RunFolderError(
                    f"cannot read the lock '{self.path}' ({type(exc).__name__}: {exc.strerror or exc}); "
                    f"check the permissions of the run folder") from None
            try:
                record = json.loads(text)
                if isinstance(record, dict) and isinstance(record.get("pid"), int):
                    return record, inode
            except ValueError:
                pass
            if time.monotonic() >= deadline:
                return {}, inode
            time.sleep(0.05)

    def _remove_if_same(self, inode: int) -> bool:
        """Remove the lock file if it is still the file we judged (same inode); True if removed.

        The file is first renamed to a name of our own (atomic), so two processes taking over the same
        stale lock cannot remove each other's fresh one; a file that turns out to be another one (created
        after we looked) is put back with os.link, which never overwrites.
        """
        aside = f"{self.path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise RunFolderError(
                f"cannot take over the stale lock '{self.path}' ({type(exc).__name__}: {exc.strerror or exc}); "
                f"delete it by hand if no run is using '{self.folder}'") from None
        try:
            if os.stat(aside).st_ino == inode:
                return True
            try:
                os.link(aside, self.path)  # not the one we judged: put it back
            except FileExistsError:
                pass
            return False
        finally:
            os.unlink(aside)

    def _in_use_message(self, record: dict) -> str:
        argv = record.get("argv")
        command = shlex.join(str(a) for a in argv) if isinstance(argv, list) else str(argv)
        command = command.replace("\r", "\\r").replace("\n", "\\n")  # one line, even for python -c '...'
        if len(command) > 200:
            command = command[:197] + "..."
        return (f"run folder '{self.folder}' is in use by pid {record['pid']} on host {record.get('host')} since "
                f"{record.get('started')} (started as: {command}); wait for it to finish, or use another {self.flag}; "
                f"if no such run is alive, delete '{self.path}'")
