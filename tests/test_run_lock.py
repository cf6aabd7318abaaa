"""util/run_lock.py: one run per run folder, across real processes; stale, shared and corrupt locks."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from util.errors import RunFolderError
from util.run_lock import LOCK_NAME, RunLock, read_lock

# A process that takes the lock of argv[1], says "held", and keeps it until its stdin closes;
# refused, it prints the one-line error and exits 2, as the command lines do.
HOLDER = """
import sys
from util.errors import RunFolderError
from util.run_lock import RunLock
try:
    lock = RunLock(sys.argv[1]).acquire()
except RunFolderError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def start_holder(folder):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **fields):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
              "shared_id": None, "argv": ["python", "dcdp.py"], **fields}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    run = tmp_path / "run"
    first = start_holder(run)
    try:
        assert first.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, input="", capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert lines[0].startswith(f"error: run folder '{run}' is in use by pid {first.pid} on host "
                                   f"{socket.gethostname()} since ")
        assert "(started as: " in lines[0] and "use another --save_dir" in lines[0]
        assert lines[0].endswith(f"if no such run is alive, delete '{run / LOCK_NAME}'")
    finally:
        first.communicate("", timeout=60)  # closes its stdin: it releases and exits
    assert first.returncode == 0 and not (run / LOCK_NAME).exists()
    third = subprocess.run([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, input="", capture_output=True,
                           text=True, timeout=60)
    assert third.returncode == 0 and third.stdout.strip() == "held", third.stderr


def test_lock_records_the_holder_and_release_removes_it(tmp_path):
    with RunLock(tmp_path / "new" / "run", argv=["python", "dcdp.py", "--save_dir", "x y"]) as lock:
        record = read_lock(tmp_path / "new" / "run")
        assert lock.owned and record == lock.record
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["shared_id"] is None and record["argv"] == ["python", "dcdp.py", "--save_dir", "x y"]
        assert "T" in record["started"]  # ISO 8601
        with pytest.raises(RunFolderError, match=r"started as: python dcdp.py --save_dir 'x y'\)"):
            RunLock(tmp_path / "new" / "run").acquire()  # the same process, a second run: refused too
    assert read_lock(tmp_path / "new" / "run") is None
    lock = RunLock(tmp_path / "new" / "run")
    lock.acquire()
    lock.release()
    lock.release()  # twice is harmless
    assert not (tmp_path / "new" / "run" / LOCK_NAME).exists()


def test_a_dead_holder_on_this_host_is_stale_and_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING, logger="dcdp.run_lock"), RunLock(tmp_path) as lock:
        assert lock.owned and read_lock(tmp_path)["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"stale lock of pid {pid}" in warnings[0] and "\n" not in warnings[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), proc_start=1)  # our pid, but not our start time
    with RunLock(tmp_path) as lock:
        assert lock.owned


def test_a_holder_on_another_host_is_never_judged_dead(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), host="other-node-17")
    with pytest.raises(RunFolderError, match=r"in use by pid \d+ on host other-node-17 since 2026-01-01"):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path)["host"] == "other-node-17"  # left alone


def test_ranks_of_one_run_share_its_lock(tmp_path):
    with RunLock(tmp_path, shared_id="job-1") as rank0:
        assert rank0.owned
        with RunLock(tmp_path, shared_id="job-1", create=False) as rank1:
            assert not rank1.owned and rank1.record == rank0.record
        assert read_lock(tmp_path) == rank0.record  # the joining rank did not delete it
        with pytest.raises(RunFolderError, match="in use by pid"):
            RunLock(tmp_path, shared_id="job-2").acquire()  # another run
        with pytest.raises(RunFolderError, match="in use by pid"):
            RunLock(tmp_path).acquire()  # no shared id: never shared
    assert read_lock(tmp_path) is None


def test_a_restarted_rank_0_takes_over_its_runs_stale_lock(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), shared_id="job-1")
    with RunLock(tmp_path, shared_id="job-1") as lock:
        assert lock.owned and read_lock(tmp_path)["pid"] == os.getpid()
    assert read_lock(tmp_path) is None


def test_a_joining_rank_waits_for_rank_0_and_then_gives_up(tmp_path):
    def rank0_later():
        time.sleep(0.3)
        RunLock(tmp_path, shared_id="job-1").acquire()  # never released: the test's tmp_path goes away

    thread = threading.Thread(target=rank0_later)
    thread.start()
    with RunLock(tmp_path, shared_id="job-1", create=False, join_wait_s=30) as rank1:
        assert not rank1.owned and rank1.record["shared_id"] == "job-1"
    thread.join()
    assert read_lock(tmp_path)["shared_id"] == "job-1"
    with pytest.raises(RunFolderError, match="has no lock of run 'job-9' after 0.2 s"):
        RunLock(tmp_path / "empty", shared_id="job-9", create=False, join_wait_s=0.2).acquire()
    with pytest.raises(ValueError, match="shared_id"):
        RunLock(tmp_path, create=False)


def test_release_leaves_a_lock_that_is_no_longer_ours_alone(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).unlink()  # e.g. deleted by hand, and another run took the folder
    other = write_lock(tmp_path, pid=12345, host="elsewhere")
    lock.release()
    assert read_lock(tmp_path) == other


def test_an_unreadable_lock_is_reread_then_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text("")  # a writer that died between creating and writing it
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dcdp.run_lock"), RunLock(tmp_path, unreadable_wait_s=0.3) as lock:
        assert lock.owned and time.monotonic() - start >= 0.3
    assert len([r for r in caplog.records if "empty or not a lock record" in r.getMessage()]) == 1
    assert read_lock(tmp_path) is None

    # a lock being written: empty at first, complete a moment later; it is read once complete and refused
    (tmp_path / LOCK_NAME).write_text("")

    def finish_writing():
        time.sleep(0.2)
        write_lock(tmp_path, host="writer-host")

    thread = threading.Thread(target=finish_writing)
    thread.start()
    with pytest.raises(RunFolderError, match="in use by pid .* on host writer-host"):
        RunLock(tmp_path, unreadable_wait_s=10).acquire()
    thread.join()
    (tmp_path / LOCK_NAME).write_text("{not json")
    assert read_lock(tmp_path) == {}


def test_an_unusable_folder_is_one_run_folder_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunFolderError, match=r"cannot create run folder '.*file/run' \((FileExistsError|NotADirectoryError)"):
        RunLock(tmp_path / "file" / "run").acquire()
    if os.geteuid() != 0:  # root writes anywhere
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(RunFolderError, match="cannot create the lock .*use a writable --save_dir"):
                RunLock(tmp_path).acquire()
        finally:
            tmp_path.chmod(0o700)


def test_two_processes_racing_for_a_free_folder_one_wins(tmp_path):
    procs = [start_holder(tmp_path) for _ in range(2)]
    try:
        # the winner says "held"; the loser exits 2 with the refusal
        outs = []
        for p in procs:
            line = p.stdout.readline().strip()
            outs.append(line)
        assert sorted(outs) == ["", "held"]
        loser = procs[outs.index("")]
        assert loser.wait(timeout=60) == 2 and "is in use by pid" in loser.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.communicate("", timeout=60)
    assert read_lock(tmp_path) is None
