"""The local teacher server: a project checkpoint behind an OpenAI-compatible HTTP API on 127.0.0.1.

Command line::

    python -m teacher.server --checkpoint DIR [--tokenizer tokenizer.json] [options]
    python -m teacher.server --hf DIR [options]            # a Hugging Face LlamaForCausalLM directory
    python -m teacher.server --gguf FILE [options]         # a Llama-family GGUF (converted once, cached)
    python -m teacher.server --random-init --tokenizer tokenizer.json [--model-json '{"num_layers": 2, ...}']
                             [--seed 0] [options]

    options: --host 127.0.0.1  --port 0 (0 picks a free port)  --model-name local-teacher
             --api-key-env VAR (bearer key read from that environment variable; none: no auth)
             --max-batch-size 16  --batch-wait-ms 5  --inject-latency-ms 0  --max-logprobs 20
             --max-model-len N (default: the model's seq_length)  --threads 1  --log-level warning
             --parent-pid PID (stop when that process, the starter, exits)

Once listening it prints one line ``local teacher server listening on http://HOST:PORT/v1`` (the bound port,
also when ``--port 0``). ``SIGTERM``/``SIGINT`` stop it gracefully. The key is taken from the environment,
never from the command line, so it appears in no process listing or log. ``--inject-latency-ms`` adds a fixed
asynchronous sleep to every request (benchmarks measure client concurrency with it; it does not hold up the
batch). The API itself (endpoints, shapes, extensions, chat template) is described in ``teacher.server_app``,
the batching in ``teacher.server_batching``.

From Python, ``local_teacher_server(...)`` starts the server as a subprocess, waits until ``/v1/models``
answers, yields a ``RunningServer`` (``base_url``, ``port``, ``api_key``, ``metrics()``) and stops it on exit;
it passes ``--parent-pid``, so the server also stops when the starting process is killed without cleanup.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from student.settings import ModelSettings
from teacher.settings import LocalTeacherSettings

if TYPE_CHECKING:
    from student.inference import InferenceModel
    from student.tokenizer import StudentTokenizer

log = logging.getLogger(__name__)

READY = re.compile(r"local teacher server listening on (http://\S+:(\d+)/v1)")
KEY_ENV = "DISTILL_LOCAL_TEACHER_API_KEY"
# torchrun's variables: a server started from inside a distributed job must not join that job's group
LAUNCHER_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = LocalTeacherSettings()
    p = argparse.ArgumentParser(prog="python -m teacher.server", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory written by student.checkpoint")
    source.add_argument(
        "--hf", type=Path, help="Hugging Face LlamaForCausalLM directory (config.json + safetensors)"
    )
    source.add_argument("--gguf", type=Path, help="Llama-family GGUF file (dequantized once, cached)")
    source.add_argument("--random-init", action="store_true", help="serve a seeded untrained model")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the checkpoint's own)")
    p.add_argument("--model-json", default="{}", help="ModelSettings as JSON (with --random-init)")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="where --gguf conversions are kept (default: ~/.cache)"
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (with --random-init)")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--model-name", default="local-teacher", help="name served at /v1/models")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the bearer key")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms)
    p.add_argument("--inject-latency-ms", type=float, default=defaults.inject_latency_ms)
    p.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs)
    p.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    p.add_argument("--log-level", default="warning")
    p.add_argument(
        "--simulate-shifted-echo", action="store_true", help="tests: answer echo scores one position late"
    )
    p.add_argument(
        "--parent-pid", type=int, default=None, help="stop when this process exits (the starter's own pid)"
    )
    args = p.parse_args(argv)
    if args.random_init and args.tokenizer is None:
        p.error("--random-init needs --tokenizer")
    if args.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        p.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    return args


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """SIGTERM this process once ``parent_pid`` is no longer its parent: a starter killed outright (a cancelled
    flow run, SIGKILL) must not leave a server holding its port and memory. The signal stops uvicorn gracefully,
    or ends a model load that has not finished."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.warning("parent process %d has exited; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _load_model(args: argparse.Namespace) -> InferenceModel:
    """The served model at TP=1, from whichever source the command line names."""
    from student.inference import InferenceModel
    from student.tokenizer import StudentTokenizer

    if args.checkpoint is not None:
        return InferenceModel.from_checkpoint(args.checkpoint, args.tokenizer)
    if args.hf is not None or args.gguf is not None:
        directory = args.hf if args.hf is not None else cached_gguf_conversion(args.gguf, args.cache_dir)
        return InferenceModel.from_hf(directory, args.tokenizer)
    settings = ModelSettings.model_validate_json(args.model_json)
    return InferenceModel.random_init(settings, StudentTokenizer.load(args.tokenizer), args.seed)


def _chat_template(tokenizer: StudentTokenizer) -> Callable[[list[dict[str, str]]], str] | None:
    """The tokenizer's own chat template, ending where the assistant's reply begins (None: it has none)."""
    if tokenizer.chat_template is None:
        return None
    return functools.partial(tokenizer.render_chat, add_generation_prompt=True)


def cached_gguf_conversion(gguf: Path, cache_dir: Path | None = None) -> Path:
    """The Hugging Face directory converted from ``gguf``, made once per file (path, size, mtime) and reused.

    The pipeline converts in its own cached stage (keyed by content); this cache serves the command line."""
    from student.gguf_import import convert_gguf

    stat = gguf.resolve().stat()
    identity = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "topk-distill"
    target = root / "gguf" / hashlib.sha256(identity).hexdigest()[:16]
    if not (target / "config.json").is_file():
        log.warning("converting %s to a Hugging Face directory in %s (once)", gguf, target)
        convert_gguf(gguf, target)
    return target


def serve(args: argparse.Namespace) -> None:
    """Load the model, then serve until SIGTERM/SIGINT (or until ``--parent-pid`` exits)."""
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # Apex/TE fallbacks: noise
    import torch
    import uvicorn

    from student.distributed import init_distributed, teardown
    from teacher.server_app import TeacherAPI, create_app
    from teacher.server_batching import BatchingEngine

    torch.set_num_threads(args.threads)
    init_distributed(tp=1)
    try:
        model = _load_model(args)
        engine = BatchingEngine(model.decoder(), args.max_batch_size, args.batch_wait_ms)
        api = TeacherAPI(
            engine,
            encode=model.tokenizer.encode,
            token_bytes=model.token_bytes,
            vocab_size=model.vocab_size,
            model_name=args.model_name,
            max_model_len=args.max_model_len or model.max_length,
            max_logprobs=args.max_logprobs,
            inject_latency_ms=args.inject_latency_ms,
            shifted_echo=args.simulate_shifted_echo,
            chat_template=_chat_template(model.tokenizer),
        )
        api_key = os.environ[args.api_key_env] if args.api_key_env else None
        app = create_app(api, api_key)
        sock = _bind(args.host, args.port)
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
        engine.start()
        print(f"local teacher server listening on http://{host}:{port}/v1", flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        teardown()


@dataclass
class RunningServer:
    """A started server process; ``api_key`` is never part of its repr."""

    base_url: str
    port: int
    process: subprocess.Popen
    api_key: str = field(repr=False, default="")
    output: deque = field(repr=False, default_factory=lambda: deque(maxlen=200))

    def metrics(self) -> dict:
        return httpx.get(self.base_url.removesuffix("/v1") + "/metrics", timeout=10).json()


def _pump(proc: subprocess.Popen, lines: deque, ready: threading.Event, found: list[str]) -> None:
    """Forward the server's output to this process's log, and spot the line that names its address."""
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        log.info("[teacher-server] %s", line)
        match = READY.search(line)
        if match and not found:
            found.append(match.group(1))
            ready.set()
    ready.set()


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def checkpoint_flag(path: Path) -> str:
    """The command-line flag that serves ``path``: a GGUF file, a Hugging Face directory or a project checkpoint."""
    if path.is_file() and path.suffix == ".gguf":
        return "--gguf"
    return "--hf" if (path / "config.json").is_file() else "--checkpoint"


def server_command(
    settings: LocalTeacherSettings,
    checkpoint: Path | None = None,
    tokenizer: Path | None = None,
    random_init: ModelSettings | None = None,
    seed: int = 0,
    model_name: str = "local-teacher",
) -> list[str]:
    """The ``python -m teacher.server`` command line for these settings (no secret in it)."""
    if (checkpoint is None) == (random_init is None):
        raise ValueError("give exactly one of checkpoint and random_init")
    cmd = [sys.executable, "-m", "teacher.server"]
    if checkpoint is not None:
        cmd += [checkpoint_flag(checkpoint), str(checkpoint)]
    else:
        cmd += ["--random-init", "--model-json", random_init.model_dump_json(), "--seed", str(seed)]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    cmd += ["--host", settings.host, "--port", str(settings.port), "--model-name", model_name]
    cmd += ["--max-batch-size", str(settings.max_batch_size), "--batch-wait-ms", str(settings.batch_wait_ms)]
    cmd += [
        "--inject-latency-ms",
        str(settings.inject_latency_ms),
        "--max-logprobs",
        str(settings.max_logprobs),
    ]
    cmd += ["--threads", str(settings.threads)]
    if settings.max_model_len is not None:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    if settings.api_key is not None:
        cmd += ["--api-key-env", KEY_ENV]
    return cmd


@contextlib.contextmanager
def local_teacher_server(
    settings: LocalTeacherSettings,
    checkpoint: Path | None = None,
    tokenizer: Path | None = None,
    random_init: ModelSettings | None = None,
    seed: int = 0,
    model_name: str = "local-teacher",
    startup_timeout_s: float = 180,
) -> Iterator[RunningServer]:
    """Start ``python -m teacher.server`` as a subprocess, wait for ``/v1/models``, stop it on exit."""
    cmd = server_command(settings, checkpoint, tokenizer, random_init, seed, model_name)
    cmd += ["--parent-pid", str(os.getpid())]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}  # always a world of one
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(settings.threads))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if settings.api_key is not None:
        env[KEY_ENV] = settings.api_key
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: deque = deque(maxlen=200)
    ready, found = threading.Event(), []
    threading.Thread(target=_pump, args=(proc, lines, ready, found), daemon=True).start()
    try:
        server = _wait_ready(proc, lines, ready, found, settings.api_key, startup_timeout_s)
        log.info("local teacher server %s (pid %d)", server.base_url, proc.pid)
        yield server
    finally:
        _stop(proc)


def _wait_ready(
    proc: subprocess.Popen,
    lines: deque,
    ready: threading.Event,
    found: list[str],
    api_key: str | None,
    timeout_s: float,
) -> RunningServer:
    deadline = time.monotonic() + timeout_s

    def fail(why: str) -> RuntimeError:
        tail = "\n".join(list(lines)[-30:])
        return RuntimeError(f"local teacher server {why}; its last output:\n{tail}")

    if not ready.wait(timeout_s) or not found:
        raise fail("did not start" if proc.poll() is None else f"exited with code {proc.poll()}")
    base_url = found[0]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(f"exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/models", headers=headers, timeout=5).status_code == 200:
                port = int(READY.search(f"local teacher server listening on {base_url}").group(2))
                return RunningServer(base_url, port, proc, api_key or "", lines)
        time.sleep(0.1)
    raise fail(f"did not answer {base_url}/models within {timeout_s}s")


def new_api_key() -> str:
    return "sk-local-" + secrets.token_urlsafe(24)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(args)


if __name__ == "__main__":
    main()
