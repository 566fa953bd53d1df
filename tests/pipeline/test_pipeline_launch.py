"""The torchrun launcher: streamed logs, failures with their output, and no process left behind.

Real processes: a child script that starts a grandchild in a session of its own (as torchrun starts its
workers), so a plain process-group kill would miss it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pipeline.launch import LaunchError, launch
from tests.support import ROOT, test_env

TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    marker = sys.argv[1]
    subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(0.2)", marker],
                     start_new_session=True)
    print("line one", flush=True)
    for pct in range(0, 101, 10):
        sys.stdout.write(f"\\rtrain: {pct}%|##| {pct}/100"); sys.stdout.flush(); time.sleep(0.01)
    print("", flush=True)
    print("line two", flush=True)
    time.sleep(float(sys.argv[2]))
    sys.exit(int(sys.argv[3]))
    """
)


def _alive(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if marker in cmd and proc.pid != os.getpid():
            found.append(proc)
    return found


def _wait_gone(marker: str, timeout: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _alive(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    return script


def test_streams_lines_throttles_progress_and_reaps_grandchildren(tree: Path) -> None:
    marker = f"marker-{os.getpid()}-ok"
    lines: list[str] = []
    launch([sys.executable, str(tree), marker, "0", "0"], log=lines.append, progress_interval=3600)
    assert lines[0] == "line one" and lines[-1] == "line two"
    progress = [line for line in lines if "%|" in line]
    # 11 carriage-return updates: the first passes, later ones are held back, the last is flushed on the next line
    assert (
        progress[0].startswith("train: 0%") and progress[-1].startswith("train: 100%") and len(progress) == 2
    )
    assert _wait_gone(marker) == []  # the orphaned grandchild was terminated too


def test_failure_raises_with_exit_code_and_output(tree: Path) -> None:
    marker = f"marker-{os.getpid()}-fail"
    with pytest.raises(LaunchError, match=r"exited with code 3(.|\n)*line two"):
        launch([sys.executable, str(tree), marker, "0", "3"], log=lambda line: None)
    assert _wait_gone(marker) == []


def test_timeout_kills_the_whole_tree(tree: Path) -> None:
    marker = f"marker-{os.getpid()}-timeout"
    with pytest.raises(TimeoutError):
        launch([sys.executable, str(tree), marker, "600", "0"], log=lambda line: None, timeout=3)
    assert _wait_gone(marker) == []


def test_parent_killed_with_sigkill_leaves_no_descendant(tree: Path) -> None:
    """The pipeline process dies without running any cleanup: the supervisor (PDEATHSIG) still reaps all."""
    marker = f"marker-{os.getpid()}-orphan"
    parent_code = (
        "import sys\nfrom pipeline.launch import launch\n"
        f"launch([sys.executable, {str(tree)!r}, {marker!r}, '600', '0'], log=print)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], cwd=ROOT, env=test_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout.readline().strip() == "line one"
        deadline = time.monotonic() + 20
        while len(_alive(marker)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(marker), "the grandchild never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_gone(marker) == []
    finally:
        if parent.poll() is None:
            parent.kill()
        for proc in _alive(marker):
            proc.kill()


def test_supervisor_survives_a_burst_of_stop_signals(tree: Path, tmp_path: Path) -> None:
    """Cancellation can deliver SIGTERM twice (PDEATHSIG and the group kill) plus SIGHUP within microseconds;
    a handler that takes a lock deadlocks when the next signal interrupts it, leaving the supervisor asleep."""
    for attempt in range(5):
        marker = f"marker-{os.getpid()}-burst-{attempt}"
        out = tmp_path / f"supervisor-{attempt}.log"
        cmd = [sys.executable, "-m", "pipeline.launch", sys.executable, str(tree), marker, "600", "0"]
        with out.open("w") as sink:
            supervisor = subprocess.Popen(
                cmd, cwd=ROOT, env=test_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 30
            while "line one" not in out.read_text() or not _alive(marker):
                assert time.monotonic() < deadline and supervisor.poll() is None, out.read_text()
                time.sleep(0.05)
            deadline = time.monotonic() + 30
            while supervisor.poll() is None and time.monotonic() < deadline:  # signals until it has exited
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    supervisor.send_signal(sig)
                time.sleep(0.0005)
            assert supervisor.poll() is not None, "supervisor hung"
            assert _wait_gone(marker) == [], (supervisor.returncode, out.read_text())
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
            for proc in _alive(marker):
                proc.kill()
