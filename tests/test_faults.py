"""Faults: a killed command takes its worker processes with it, a second writer into the same folder is
refused, what a killed writer left is cleaned by the next one, outputs honour the umask, and progress
bars stay out of logs. The signal tests start real `lorabench` processes and kill them."""

import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.outputs.results import writer_lock

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process, None once it is gone (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (state := process_state(int(entry.name))) and state[1] == pid:
            found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorabench", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def workers_busy(proc: subprocess.Popen, folder: Path, pattern: str) -> list[int] | None:
    """The parent's child processes (workers and multiprocessing's resource tracker) once two workers
    have started and a temporary folder exists."""
    kids = children(proc.pid)
    if proc.poll() is not None:
        raise AssertionError(f"lorabench exited early: {proc.stderr.read()}")
    workers = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    return kids if len(workers) >= 2 and any(folder.glob(pattern)) else None


@linux_only
def test_kill_9_of_a_sweep_takes_its_workers_and_their_tracker_along(tmp_path):
    out = tmp_path / "sweep"
    proc = start(["sweep", "--n-loras", "1,2,3,4", "--requests", "100000", "--model", "tiny", "--jobs", "2",
                  "--no-progress", "--out", str(out)], tmp_path)
    kids = wait_for(lambda: workers_busy(proc, out / "points", ".*.tmp"), 120, "two busy sweep workers")
    proc.kill()
    proc.wait()
    wait_for(lambda: all(process_state(k) is None for k in kids), 10, f"workers {kids} to exit after kill -9")


@linux_only
@pytest.mark.parametrize("signum,status,said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_or_sigint_of_a_run_stops_its_workers_and_removes_its_temporary_folder(tmp_path, signum, status, said):
    out = tmp_path / "run"
    proc = start(["run", "--requests", "100000", "--model", "tiny", "--jobs", "2", "--no-progress", "--out", str(out)],
                 tmp_path)
    kids = wait_for(lambda: workers_busy(proc, tmp_path, ".run.*.tmp"), 120, "two busy run workers")
    proc.send_signal(signum)  # to the parent alone, as `kill` sends it
    assert proc.wait(timeout=30) == status
    assert f"lorabench run: {said}" in proc.stderr.read()
    wait_for(lambda: all(process_state(k) is None for k in kids), 5, f"workers {kids} to exit")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, no temporary folder, no lock


def test_a_second_writer_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    with writer_lock(out):  # as a live `lorabench sweep` holds it
        code = main(["sweep", "--n-loras", "1", "--requests", "10", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"another lorabench process (pid {os.getpid()}) is writing it" in err
    assert not out.exists()
    # once the writer is gone the folder is free again, and its lock file is gone with it
    assert main(["sweep", "--n-loras", "1", "--requests", "10", "--no-progress", "--out", str(out)]) == 0
    assert not (tmp_path / ".sweep.lock").exists()


def test_what_a_killed_writer_left_is_removed_by_the_next_one(tmp_path, capsys):
    # a run killed with -9: its temporary folder, and its lock file (which no process holds any more)
    stale = tmp_path / ".run.0a1b2c3d.tmp"
    (stale / "requests").mkdir(parents=True)
    (stale / "requests" / "single.csv").write_text("id\n")
    (tmp_path / ".run.lock").write_text("999999\n")
    other = tmp_path / ".older.x1y2z3.tmp"  # another killed run of the same parent folder
    other.mkdir()
    (tmp_path / ".older.lock").write_text("999998\n")
    foreign = tmp_path / ".someone-else.tmp"  # not lorabench's: left alone
    foreign.mkdir()
    assert main(["run", "--requests", "10", "--no-progress", "--jobs", "1", "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".someone-else.tmp", "run"]
    # a sweep: half-written files and point folders inside its own folder
    sweep = tmp_path / "sweep"
    args = ["sweep", "--n-loras", "1", "--requests", "10", "--no-progress", "--out", str(sweep)]
    assert main(args) == 0
    (sweep / ".sweep.csv.5f5f5f5f.tmp").write_text("half")
    (sweep / "points" / ".2.abcdefgh.tmp").mkdir()
    assert main(args) == 0
    assert not [p for p in sweep.rglob("*") if p.name.endswith(".tmp")]
    capsys.readouterr()


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_outputs_honour_the_umask(tmp_path, umask, capsys):
    previous = os.umask(umask)
    try:
        assert main(["run", "--requests", "10", "--no-progress", "--jobs", "1", "--out", str(tmp_path / "run")]) == 0
        assert main(["sweep", "--n-loras", "1", "--requests", "10", "--no-progress", "--out",
                     str(tmp_path / "sweep")]) == 0
        assert main(["adapters", "synth", "--n", "2", "--layers", "1", "--out", str(tmp_path / "adapters")]) == 0
        assert main(["compress", str(tmp_path / "adapters"), "--rank", "2", "--quiet", "--out",
                     str(tmp_path / "compressed")]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    paths = [p for p in tmp_path.rglob("*")]
    assert len(paths) > 30
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path}: {oct(path.stat().st_mode)}"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    args = ["run", "--requests", "40", "--jobs", "1", "--strategy", "single"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal here: no cursor codes
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "\r" in terminal.getvalue() and "req" in terminal.getvalue()
