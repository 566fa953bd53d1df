"""A fault-injecting HTTP proxy in front of a teacher server, run as its own process for fault tests.

    python -m teacher.fault_proxy --upstream http://127.0.0.1:8000 --port 0 --plan plan.json

It speaks plain HTTP/1.1 with keep-alive on 127.0.0.1 and forwards to ``--upstream``. The plan (a JSON file or
inline JSON) says which requests get which fault:

    {"sequence": ["429", "500", "503", "slow", "drop", "malformed", "nologprobs"],
     "match": {"POISON": "500"}, "retry_after_s": 1, "slow_s": 5, "latency_s": 0}

``sequence``: faults for the 1st, 2nd, ... POST in arrival order, then requests pass through; an empty string
passes one through. ``match``: a fault for every POST whose body contains the substring (e.g. one prompt that
must exhaust the client's retries). Faults: ``429`` (with Retry-After), ``500``, ``503``, ``slow`` (wait
``slow_s`` before forwarding, to exceed the client timeout), ``drop`` (close the connection without an answer),
``malformed`` (the upstream 200 body cut in half), ``nologprobs`` (the upstream 200 with logprobs removed),
``html502`` (a gateway's HTML error page, as nginx sends when its upstream fails). ``latency_s`` delays every
forwarded POST.
``"fail_after": N`` gives every POST after the first N the fault ``fail_with`` (default ``"503"``): a replica
that dies midway. ``"gzip": true`` sends every forwarded 200 body gzip-compressed (``content-encoding: gzip``), as
a gateway in front of a teacher may.

``GET /_proxy/stats`` answers the counts and the prompts that were forwarded upstream, so tests can check what
the teacher was asked. It prints ``fault_proxy listening on http://127.0.0.1:PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import signal
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("teacher.fault_proxy")

FAULTS = ("", "429", "500", "503", "slow", "drop", "malformed", "nologprobs", "html502")
BAD_GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>"
    b"\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"
)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class Plan:
    sequence: list[str] = field(default_factory=list)
    match: dict[str, str] = field(default_factory=dict)
    retry_after_s: float = 1.0
    slow_s: float = 5.0
    latency_s: float = 0.0  # added to every forwarded POST (paces a run, e.g. to kill it midway)
    fail_after: int | None = None  # POSTs after the first fail_after all get fail_with
    fail_with: str = "503"
    gzip: bool = False  # forwarded 200 bodies sent with content-encoding: gzip

    @classmethod
    def load(cls, text: str) -> Plan:
        path = Path(text)
        raw = json.loads(path.read_text(encoding="utf-8") if path.is_file() else text)
        plan = cls(**raw)
        for fault in [*plan.sequence, *plan.match.values(), plan.fail_with]:
            if fault not in FAULTS:
                raise ValueError(f"plan: unknown fault {fault!r}; expected one of {FAULTS}")
        return plan


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


class FaultProxy:
    def __init__(self, upstream: str, plan: Plan) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = plan
        self.posts = 0
        self.counts: Counter[str] = Counter()
        self.forwarded_prompts: list[Any] = []
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)
        )

    def fault_for(self, request: Request) -> str:
        if request.method != "POST":
            return ""
        self.posts += 1
        for needle, fault in self.plan.match.items():
            if needle.encode("utf-8") in request.body:
                return fault
        index = self.posts - 1
        if self.plan.fail_after is not None and self.posts > self.plan.fail_after:
            return self.plan.fail_with
        return self.plan.sequence[index] if index < len(self.plan.sequence) else ""

    def stats(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "forwarded": self.counts["forwarded"],
            "faults": {k: v for k, v in self.counts.items() if k != "forwarded"},
            "forwarded_prompts": self.forwarded_prompts,
        }

    async def forward(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        response = await self.client.request(
            request.method, self.upstream + request.target, headers=headers, content=request.body
        )
        self.counts["forwarded"] += 1
        if request.method == "POST":
            try:
                body = json.loads(request.body)
                self.forwarded_prompts.append(body.get("prompt", body.get("messages")))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                self.forwarded_prompts.append(None)
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        return response.status_code, kept, response.content

    async def answer(self, request: Request) -> tuple[int, dict[str, str], bytes] | None:
        """The response to send, or None to drop the connection."""
        if request.method == "GET" and request.target == "/_proxy/stats":
            return 200, {"content-type": "application/json"}, json.dumps(self.stats()).encode()
        fault = self.fault_for(request)
        if fault:
            self.counts[fault] += 1
            log.info("request %d: injecting %s", self.posts, fault)
        if fault in ("429", "500", "503"):
            headers = {"content-type": "application/json"}
            if fault == "429":
                headers["retry-after"] = str(self.plan.retry_after_s)
            error = {"error": {"message": f"injected {fault}", "type": "fault_proxy", "code": fault}}
            return int(fault), headers, json.dumps(error).encode()
        if fault == "html502":
            return 502, {"content-type": "text/html"}, BAD_GATEWAY_PAGE
        if fault == "drop":
            return None
        if fault == "slow":
            await asyncio.sleep(self.plan.slow_s)
        if request.method == "POST" and self.plan.latency_s:
            await asyncio.sleep(self.plan.latency_s)
        status, headers, body = await self.forward(request)
        if status == 200 and fault == "malformed":
            body = body[: len(body) // 2]
        elif status == 200 and fault == "nologprobs":
            data = json.loads(body)
            for choice in data.get("choices", []):
                choice["logprobs"] = None
                choice.pop("prompt_logprobs", None)
            body = json.dumps(data).encode()
        if status == 200 and self.plan.gzip:
            headers, body = {**headers, "content-encoding": "gzip"}, gzip.compress(body, compresslevel=1)
        return status, headers, body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                answer = await self.answer(request)
                if answer is None:
                    writer.transport.abort()
                    return
                status, headers, body = answer
                write_response(writer, status, headers, body, request.keep_alive)
                await writer.drain()
                if not request.keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
            log.info("connection ended: %s", type(exc).__name__)
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, headers, body)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def write_response(
    writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes, keep_alive: bool
) -> None:
    lines = [f"HTTP/1.1 {status} {_phrase(status)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"content-length: {len(body)}", f"connection: {'keep-alive' if keep_alive else 'close'}"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


async def serve(upstream: str, port: int, plan: Plan) -> None:
    proxy = FaultProxy(upstream, plan)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(f"fault_proxy listening on http://127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    await proxy.client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teacher.fault_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="Base URL of the real server (http://host:port).")
    parser.add_argument("--port", type=int, default=0, help="Port to listen on, 127.0.0.1 (0: a free one).")
    parser.add_argument(
        "--plan", default="{}", help="Fault plan: a JSON file or inline JSON (see module doc)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        plan = Plan.load(args.plan)
    except (ValueError, TypeError) as exc:
        parser.error(f"--plan: {exc}")
    asyncio.run(serve(args.upstream, args.port, plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
