"""Deployments on a real Prefect server: ``prefect server start`` + ``distill serve`` (one process serving
``distill/default`` and the cron-scheduled ``refresh/nightly``), a run triggered with ``prefect deployment run``,
the run's page rendered by headless Chromium, and cancellation during training leaving no process behind.

Uses the module's tiny project; its stages were built by test_flows_distill when that ran first, so the
deployment run reuses them (and builds them otherwise).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.pipeline.tiny_project import TinyProject
from tests.support import PYTHON, ROOT, free_port, recorded, start_logged, stop_group, test_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PREFECT = str(Path(PYTHON).parent / "prefect")
ARTIFACTS = ROOT / "test-artifacts"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STAGES = {"prepare_corpus", "collect", "train_soft", "train_hard", "evaluate", "report"}
TRAINER_MARKERS = ("student.train", "torch.distributed.run", "pipeline.launch")


class Server:
    def __init__(self, api: str, env: dict[str, str], logs: Path) -> None:
        self.api, self.env, self.logs = api, env, logs
        self.ui = api.removesuffix("/api")

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> list | dict:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def trigger(self, config: Path) -> str:
        """``prefect deployment run 'distill/default' --param config=...``; returns the flow run id."""
        out = self.prefect("deployment", "run", "distill/default", "--param", f"config={config}")
        assert out.returncode == 0, out.stdout + out.stderr
        match = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
        assert match, out.stdout
        return match.group(1)

    def wait_state(self, flow_run_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state_type"] in states:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} not in {states} after {timeout}s: {run['state_type']}")

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        """{task run name: state name}, once every stage's task run is recorded in a final state."""
        runs = recorded(
            lambda: self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}),
            lambda runs: {r["name"] for r in runs} >= STAGES and all(r["state_type"] in FINAL for r in runs),
        )
        return {r["name"]: r["state_name"] for r in runs}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_project: TinyProject) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = test_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(home / "results"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
    )
    server_proc = start_logged(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home / "server.log",
        env,
        home,
    )
    serve_proc = None
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server_proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not become healthy"
            time.sleep(1)
        config = tiny_project.config()
        serve_proc = start_logged(
            [PYTHON, "-m", "pipeline.cli", "serve", "--config", str(config)], home / "serve.log", env, ROOT
        )
        srv = Server(api, env, home)
        deadline = time.monotonic() + 120
        while True:
            names = {d["name"] for d in srv.post("/deployments/filter", {})}
            if {"default", "nightly"} <= names:
                break
            assert serve_proc.poll() is None, (home / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"deployments not registered: {names}"
            time.sleep(1)
        yield srv
    finally:
        if serve_proc is not None:
            stop_group(serve_proc)
        stop_group(server_proc)


@pytest.fixture(scope="module")
def completed_run(server: Server, tiny_project: TinyProject) -> str:
    flow_run_id = server.trigger(tiny_project.config())
    run = server.wait_state(flow_run_id, FINAL, timeout=700)
    assert run["state_type"] == "COMPLETED", (server.logs / "serve.log").read_text()[-4000:]
    return flow_run_id


def test_deployment_run_completes_and_refresh_is_scheduled(server: Server, completed_run: str) -> None:
    stages = server.task_states(completed_run)  # every stage, each in a final state
    assert set(stages.values()) <= {"Completed", "Cached"}
    run = server.get(f"/flow_runs/{completed_run}")
    assert run["parameters"]["config"].endswith("tiny.toml")
    nightly = server.get("/deployments/name/refresh/nightly")
    crons = [s["schedule"].get("cron") for s in nightly["schedules"]]
    assert crons == ["0 3 * * *"] and nightly["schedules"][0]["schedule"]["timezone"] == "UTC"
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [completed_run]}}})
    kinds = {a["type"] for a in artifacts}
    assert {"markdown", "table"} <= kinds, kinds
    report = next(a for a in artifacts if a["key"] == "distill-report")
    assert "data:image/png;base64," in report["data"]  # the loss plot, embedded


def _chromium(url: str, *args: str, budget_ms: int = 10_000) -> subprocess.CompletedProcess:
    binary = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-chromium.sh")], capture_output=True, text=True, timeout=900
    )
    assert binary.returncode == 0, binary.stderr
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary.stdout.strip().splitlines()[-1], "--headless", "--no-sandbox", "--disable-gpu"]
        cmd += ["--disable-quic", "--no-first-run", "--disable-background-networking"]
        cmd += ["--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
        cmd += [f"--virtual-time-budget={budget_ms}", "--window-size=1400,900", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_ui_shows_the_run_and_its_stages(server: Server, completed_run: str) -> None:
    run = server.get(f"/flow_runs/{completed_run}")
    url = f"{server.ui}/runs/flow-run/{completed_run}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "prefect-flow-run.png"
    shot.unlink(missing_ok=True)
    assert _chromium(url, f"--screenshot={shot}").returncode == 0
    assert shot.is_file() and shot.stat().st_size > 10_000
    stages = server.task_states(completed_run)
    # The run's logs (which name the stages) arrive by a later API call than the page itself; on a loaded
    # machine they can miss the first virtual-time budget, so the dump is retried with a longer one.
    for budget_ms in (10_000, 30_000, 60_000):
        dom = _chromium(url, "--dump-dom", budget_ms=budget_ms)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        shown = {stage for stage in stages if re.search(rf"\b{stage}\b", html)}
        if {"prepare_corpus", "tokenizer"} <= shown:
            break
    (ARTIFACTS / "prefect-flow-run.html").write_text(html)
    assert run["name"] in html and "distill" in html and "Completed" in html
    assert {"prepare_corpus", "tokenizer"} <= shown, shown  # the first page of the run's task-run logs


def _trainers(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(root) in cmd and any(marker in cmd for marker in TRAINER_MARKERS):
            found.append(proc)
    return found


def _describe(proc: psutil.Process) -> str:
    """A straggler's pid, state, age, parent and command line, so a failure says which link of the chain held."""
    with proc.oneshot():
        try:
            parent = proc.parent()
            parent_cmd = " ".join(parent.cmdline()) if parent else "-"
            return (
                f"pid {proc.pid} {proc.status()} age {time.time() - proc.create_time():.0f}s "
                f"ppid {proc.ppid()} ({parent_cmd[:200]}): {' '.join(proc.cmdline())[:300]}"
            )
        except psutil.Error as exc:
            return f"pid {proc.pid}: {exc!r}"


def test_cancel_during_training_leaves_no_trainer(
    server: Server, tiny_project: TinyProject, completed_run: str
) -> None:
    long = tiny_project.config("tiny-long.toml", train={"steps": 100_000, "checkpoint_every": 100_000})
    flow_run_id = server.trigger(long)
    deadline = time.monotonic() + 400
    while not [p for p in _trainers(tiny_project.root) if "student.train" in " ".join(p.cmdline())]:
        assert server.get(f"/flow_runs/{flow_run_id}")["state_type"] not in FINAL, "run ended before training"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(1)
    time.sleep(3)  # let the ranks get going
    assert len(_trainers(tiny_project.root)) >= 3  # supervisor, torchrun, ranks
    out = server.prefect("flow-run", "cancel", flow_run_id)
    assert out.returncode == 0, out.stdout + out.stderr
    run = server.wait_state(flow_run_id, FINAL, timeout=120)
    assert run["state_type"] == "CANCELLED"
    deadline = time.monotonic() + 60
    while (left := _trainers(tiny_project.root)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == [], [_describe(p) for p in left]
