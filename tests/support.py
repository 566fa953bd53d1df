"""Helpers shared by tests: free ports, the project's Python, and bounded subprocess runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1"}
    )
    env.update(extra)
    return env


test_env.__test__ = False  # a helper, not a test, despite its name


def run_bounded(
    cmd: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail loudly.

    Distributed runs hang rather than fail, so every torchrun in the tests goes through here.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env=env or test_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def torchrun(
    nproc: int,
    module_args: list[str],
    timeout: float = 240,
    extra_launcher_args: list[str] | None = None,
    **env: str,
):
    """``torchrun --standalone --nproc-per-node=N -m ...`` bounded by a timeout; returns CompletedProcess."""
    cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd += extra_launcher_args if extra_launcher_args is not None else ["--standalone"]
    return run_bounded(cmd + module_args, timeout=timeout, env=test_env(**env))
