"""Exact resume after SIGKILL, and a two-"node" launch, against one uninterrupted single-launcher run.

All runs train the same TP=1 x DP=2 soft-CE student for 30 steps, logging every step, on real text stored through
the storage layer: train / val snapshots of bigram-teacher records read by ``storage.reader.PackedReader``
(``worker_model_corpus.prepare_snapshot``), so the reader's data position is part of what must resume exactly. The reference is one ``torchrun --nproc-per-node=2`` job. The interrupted job is SIGKILLed
(launcher and ranks) after it logged step 12, past its step-10 checkpoint; ``resume: true`` then continues it
from that checkpoint. The two-node job is two torchrun launchers (``--nnodes=2``, c10d rendezvous on
127.0.0.1), one rank each, as a cluster would start it. Dropout is on (hidden and attention), so the CPU
generator and megatron's model-parallel RNG tracker must be restored exactly as well.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.student.worker_model_corpus import prepare_snapshot, read_metrics, write_spec
from tests.support import PYTHON, ROOT, free_port, run_bounded, test_env, torchrun

pytestmark = pytest.mark.timeout(900)  # module fixtures run several torchrun jobs on a shared machine

STEPS = 30
TRAIN = {
    "tensor_parallel": 1,
    "data_parallel": 2,
    "micro_batch_size": 4,
    "steps": STEPS,
    "lr": 3e-3,
    "warmup_steps": 3,
    "log_every": 1,
    "eval_every": 10,
    "eval_batches": 2,
    "checkpoint_every": 10,
    "seed": 11,
}
LOSS = {"kind": "soft", "tail": "tail_bucket", "alpha": 0.8}
MODEL = {"hidden_dropout": 0.1, "attention_dropout": 0.1}  # the RNG streams must resume exactly too


def _curve(out: Path) -> list[tuple]:
    """(step, split, loss, lr, tokens) of every logged line: the whole loss curve, train and val."""
    return [(r["step"], r["split"], r["loss"], r["lr"], r["tokens"]) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_snapshot(tmp_path_factory.mktemp("stdlib"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    spec = write_spec(tmp / "spec.json", data, tmp / "out", TRAIN, LOSS, MODEL)
    proc = torchrun(2, ["-m", "student.train", str(spec)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    curve = _curve(tmp / "out")
    assert len([c for c in curve if c[1] == "train"]) == STEPS
    return tmp / "out"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every descendant (torchrun may put its ranks in sessions of their own)."""
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return -1
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_loss_curve(data, reference, tmp_path):
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.json", data, out, TRAIN, LOSS, MODEL)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "student.train"]
    proc = subprocess.Popen(
        [*cmd, str(spec)], cwd=ROOT, env=test_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    try:
        while _logged_steps(out) < 12:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run never reached step 12"
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    assert not (out / "train_summary.json").exists(), "killed mid-run, not after the end"
    assert (out / "checkpoints" / "step_000010" / "meta.json").is_file()
    killed_at = _logged_steps(out)
    assert 12 <= killed_at < STEPS

    resumed = json.loads(spec.read_text()) | {"resume": True}
    spec.write_text(json.dumps(resumed))
    proc2 = torchrun(2, ["-m", "student.train", str(spec)], timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert Path(summary["resumed_from"]).name in ("step_000010", "step_000020")
    assert _curve(out) == _curve(reference)


@pytest.mark.slow
def test_two_launchers_two_nodes_match_single_launcher(data, reference, tmp_path):
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.json", data, out, TRAIN, LOSS, MODEL)
    port = free_port()
    launcher = [PYTHON, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        subprocess.Popen(
            [*launcher, f"--node-rank={rank}", "-m", "student.train", str(spec)],
            cwd=ROOT,
            env=test_env(),
            stdout=logs[rank].open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + 300
    try:
        for node in nodes:
            node.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_tree(node)
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log.read_text()[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["tensor_parallel"], summary["data_parallel"]) == (1, 2)
    assert _curve(out) == _curve(reference)


def test_bad_spec_is_a_clear_error(tmp_path):
    """Exit code 2 and every bad field named, before any process group or output exists."""
    spec = tmp_path / "spec.json"
    out = tmp_path / "out"
    spec.write_text(json.dumps({"model": {"hidden_size": -1}, "tokenizer": "nope.json", "out_dir": str(out)}))
    proc = run_bounded([PYTHON, "-m", "student.train", str(spec)], timeout=120)
    assert proc.returncode == 2
    assert f"{spec}: field 'model.hidden_size': Input should be greater than 0" in proc.stdout
    assert f"{spec}: field 'train_data': Field required" in proc.stdout
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 parameters are refused only without CUDA")
def test_bf16_without_cuda_is_a_clear_error(data, tmp_path):
    """bf16 parameters need megatron-core's mixed-precision optimizer, which runs on CUDA only (student.optim)."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.json", data, out, TRAIN | {"precision": "bf16"}, LOSS, MODEL)
    proc = run_bounded([PYTHON, "-m", "student.train", str(spec)], timeout=120)
    assert proc.returncode == 2, proc.stdout[-4000:]
    assert f"{spec}: field 'train.precision': train.precision = 'bf16' needs CUDA" in proc.stdout
    assert not (out / "metrics.jsonl").exists()
