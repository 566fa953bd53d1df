"""Launch torchrun (or any long child) so that it can never outlive the pipeline that started it.

Process tree::

    pipeline process (flow run / distill run)
      └─ supervisor  (python -m pipeline.launch CMD...)   own session; PR_SET_PDEATHSIG=SIGTERM; child subreaper
           └─ torchrun                                      its workers run in sessions of their own
                └─ trainer ranks

* The supervisor is a child subreaper, so trainer ranks orphaned by a dying torchrun are re-parented to it and
  stay visible as its descendants; when torchrun exits, or the supervisor is told to stop (SIGTERM/SIGINT, or
  its parent dies: PR_SET_PDEATHSIG plus a parent-pid poll), it terminates every descendant (SIGTERM, a grace
  period, then SIGKILL) before exiting.
* The pipeline side (:func:`launch`) streams the supervisor's output line by line into a logging callback,
  called in the caller's thread (so a Prefect task's logger sees its run context), throttling tqdm's
  carriage-return updates, and on *any* exception (cancellation, interrupt, timeout) kills
  the supervisor's process group and waits for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_SECONDS = 5.0
PARENT_ENV = "DISTILL_LAUNCH_PARENT"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# Warnings every megatron-core import prints on CPU (no TransformerEngine / Apex): noise in every log.
KNOWN_WARNINGS = (
    "ignore:Transformer Engine and Apex are not installed",
    "ignore:Apex is not installed",
    "ignore:Transformer Engine is not installed",
)


def quiet_known_warnings() -> None:
    """Silence ``KNOWN_WARNINGS`` in the subprocesses this process starts (PYTHONWARNINGS, unless already set)."""
    os.environ.setdefault("PYTHONWARNINGS", ",".join(KNOWN_WARNINGS))


class LaunchError(RuntimeError):
    """The launched command exited non-zero; the message carries the exit code and the last output lines."""


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node=N -m MODULE ARGS`` with this interpreter (free rendezvous port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]


class _Throttle:
    """Pass through real lines; let a carriage-return progress update through at most every ``interval`` s."""

    def __init__(self, emit: Callable[[str], None], interval: float) -> None:
        self.emit, self.interval, self.last = emit, interval, float("-inf")
        self.pending: str | None = None

    def progress(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.emit(text)
            self.last, self.pending = now, None
        else:
            self.pending = text

    def line(self, text: str) -> None:
        self.pending = None
        self.emit(text)

    def flush(self) -> None:
        if self.pending:
            self.emit(self.pending)
            self.pending = None


def _read(stream, lines: queue.SimpleQueue) -> None:
    """Reader thread: queue ``(is_line, text)`` pieces of the stream, then None at its end."""
    with contextlib.suppress(ValueError, OSError):  # the stream is closed under us when the launch is killed
        _split(stream, lines)
    lines.put(None)


def _split(stream, lines: queue.SimpleQueue) -> None:
    """Split on ``\\n`` (a log line) and ``\\r`` (a progress-bar update)."""
    buf = b""
    while chunk := stream.read1(65536):
        buf += chunk
        while True:
            cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            text = buf[:cut].decode("utf-8", errors="replace").rstrip()
            is_line, buf = buf[cut : cut + 1] == b"\n", buf[cut + 1 :]
            if text.strip():
                lines.put((is_line, text))
    if buf.strip():
        lines.put((True, buf.decode("utf-8", errors="replace").rstrip()))


def _drain(lines: queue.SimpleQueue, throttle: _Throttle, tail: deque[str], wait: float) -> bool:
    """Emit what the reader queued (in the caller's thread, so loggers see its context); False at end of output."""
    try:
        entry = lines.get(timeout=wait)
    except queue.Empty:
        return True
    while entry is not None:
        is_line, text = entry
        tail.append(text)
        (throttle.line if is_line else throttle.progress)(text)
        try:
            entry = lines.get_nowait()
        except queue.Empty:
            return True
    throttle.flush()
    return False


def kill_group(proc: subprocess.Popen, grace: float = GRACE_SECONDS + 5.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL it if it has not exited after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):  # stragglers left in the group
        os.killpg(proc.pid, signal.SIGKILL)


def launch(
    cmd: Sequence[str],
    log: Callable[[str], None],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    progress_interval: float = 5.0,
    timeout: float | None = None,
) -> None:
    """Run ``cmd`` under the supervisor, streaming its output to ``log``; raise LaunchError on failure.

    Whatever interrupts this call (an exception in the caller's thread, a timeout) kills the whole tree.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.launch", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={
            # torch's own deprecation notices about megatron-core's checkpoint internals (ShardedTensor,
            # load_state_dict) are not actionable here and would drown the training log; a user's setting wins.
            "PYTHONWARNINGS": "ignore::FutureWarning",
            **(env if env is not None else os.environ),
            "PYTHONUNBUFFERED": "1",
            PARENT_ENV: str(os.getpid()),
        },
        cwd=cwd,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=40)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    throttle = _Throttle(log, progress_interval)
    try:
        threading.Thread(target=_read, args=(proc.stdout, lines), daemon=True).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        more = True
        while more or proc.poll() is None:  # short waits keep this thread responsive to cancellation
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(cmd[:6])}... still running after {timeout:.0f}s")
            if more:
                more = _drain(lines, throttle, tail, wait=0.5)
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
    except BaseException:
        kill_group(proc)
        raise
    finally:
        if proc.stdout:
            proc.stdout.close()
    if proc.returncode != 0:
        raise LaunchError(
            f"command exited with code {proc.returncode}: {' '.join(cmd)}\nlast output:\n" + "\n".join(tail)
        )


def _terminate_descendants(me: psutil.Process) -> None:
    procs = me.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=GRACE_SECONDS)
    for p in alive + me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(me.children(recursive=True), timeout=5)


def supervise(cmd: Sequence[str]) -> int:
    """Run ``cmd`` as a child, adopt its orphans, and leave no descendant alive when done or told to stop."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = int(os.environ.pop(PARENT_ENV, os.getppid()))
    stopped: list[int] = []

    def on_signal(signum, frame) -> None:
        # Ignore the rest first, and take no lock: a cancellation delivers SIGTERM twice (PDEATHSIG and the
        # group kill) and maybe SIGHUP within microseconds, and a handler interrupted by the next one while
        # holding a lock (threading.Event.set) deadlocks this single thread, leaving the supervisor asleep.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        stopped.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    me = psutil.Process()
    child = subprocess.Popen(list(cmd))
    rc: int | None = None
    while rc is None and not stopped:
        if os.getppid() != parent:  # parent died and PDEATHSIG did not reach us
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = child.wait(timeout=0.5)
    _terminate_descendants(me)
    if rc is None:
        print(f"[launch] stopped: terminated {' '.join(cmd[:4])}... and its workers", flush=True)
        return 143
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))
