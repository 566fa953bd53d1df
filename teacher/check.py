"""Probing a teacher endpoint before a big collection: is it there, what can it do, do its scores line up.

``reachable`` is the one cheap request a collection makes before fanning out (an unreachable teacher fails in
seconds, naming the URL and the cause). ``check_endpoint`` asks a few small requests through the real ``openai``
client and reports the score/generate modes that work, the largest top-k accepted, whether ids and bytes come
back, and whether echo-mode scores line up with the tokens (``teacher.parsing.check_echo_alignment``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2  # the openai client's HTTP library: its errors carry httpx2 responses
import openai

from teacher.parsing import ResponseShapeError, ShiftedScoresError, parse_chat, parse_completion

PROBE_TEXT = "The café opens at 9: ☕ and 日本 tea."
K_STEPS = (20, 10, 5, 1)


class TeacherUnreachable(RuntimeError):
    """The teacher's URL does not answer at all (refused, unknown host, timeout, TLS)."""


def describe_error(exc: BaseException, url: str | None = None) -> str:
    """One line naming where (the URL) and why (the innermost cause), for connection and status errors."""
    request = getattr(exc, "request", None)
    where = url or (str(request.url) if request is not None else None)
    causes, seen, inner = [], set(), exc
    for _ in range(10):  # the chain down to the socket's own error ("Connection refused")
        if inner is None:
            break
        text = str(inner).strip()
        if text and text not in seen:
            seen.add(text)
            causes.append(f"{type(inner).__name__}: {text}")
        inner = inner.__cause__ or inner.__context__
    response = getattr(exc, "response", None)
    if isinstance(response, (httpx.Response, httpx2.Response)) and "json" not in response.headers.get(
        "content-type", "json"
    ):
        snippet = response.text[:120].replace("\n", " ")
        causes = [f"HTTP {response.status_code} with a {response.headers['content-type']} body: {snippet!r}"]
    return (f"{where}: " if where else "") + " <- ".join(causes or [type(exc).__name__])


def reachable(base_url: str, api_key: str | None, timeout_s: float = 10.0) -> None:
    """One GET of ``{base_url}/models``; any HTTP answer counts as reachable (a 404 too). Raises
    ``TeacherUnreachable`` naming the URL and the cause otherwise."""
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        cause = describe_error(exc, url)
        if isinstance(exc, httpx.ConnectError) and "refused" not in cause.lower():
            cause += " (connection refused or host unknown)"
        raise TeacherUnreachable(f"the teacher does not answer: {cause}") from None


@dataclass
class CheckReport:
    base_url: str
    model: str | None = None
    modes: dict[str, str] = field(default_factory=dict)  # mode -> "ok" or why not
    max_top_k: int = 0
    token_ids: bool = False
    token_bytes: bool = False
    scores_aligned: bool | None = None  # None: echo not supported, nothing to check
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return any(v == "ok" for v in self.modes.values()) and self.scores_aligned is not False

    def render(self) -> str:
        lines = [f"teacher {self.base_url}  model {self.model}"]
        lines += [f"  {mode:<24} {state}" for mode, state in self.modes.items()]
        lines.append(f"  max top-k accepted       {self.max_top_k or 'none'}")
        lines.append(f"  token ids on request     {'yes' if self.token_ids else 'no'}")
        lines.append(f"  token bytes (chat)       {'yes' if self.token_bytes else 'no'}")
        aligned = {None: "not checked (no echo)", True: "yes", False: "NO"}[self.scores_aligned]
        lines.append(f"  echo scores line up      {aligned}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append("verdict: " + ("usable" if self.usable else "NOT usable for collection"))
        return "\n".join(lines)


def _raw(call: Any, **kwargs: Any) -> dict:
    return json.loads(call.with_raw_response.create(**kwargs).content)


def _largest_k(client: openai.OpenAI, model: str) -> int:
    for k in K_STEPS:
        try:
            _raw(client.completions, model=model, prompt=PROBE_TEXT, logprobs=k, max_tokens=1, temperature=0)
            return k
        except openai.BadRequestError:
            continue
    return 0


def check_endpoint(
    base_url: str, model: str | None, api_key: str | None, timeout_s: float = 60
) -> CheckReport:
    """Probe ``base_url`` with small requests (see the module docstring); raises ``TeacherUnreachable``."""
    reachable(base_url, api_key, min(timeout_s, 10))
    report = CheckReport(base_url)
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=1, timeout=timeout_s)
    try:
        if model is None:
            models = client.models.list().data
            if not models:
                raise TeacherUnreachable(f"{base_url}/models lists no model: give --model")
            model = models[0].id
        report.model = model
        k = report.max_top_k = _largest_k(client, model)
        report.modes["generate: completions"] = "ok" if k else "no (no top-k accepted)"
        _probe_echo(client, model, max(k, 1), report)
        _probe_prompt_logprobs(client, model, max(k, 1), report)
        _probe_chat(client, model, max(k, 1), report)
        _probe_ids(client, model, report)
    finally:
        client.close()
    return report


def _failed(report: CheckReport, mode: str, exc: BaseException) -> None:
    report.modes[mode] = f"no ({describe_error(exc)[:160]})"


def _probe_echo(client: openai.OpenAI, model: str, k: int, report: CheckReport) -> None:
    mode = "score: echo"
    try:
        body = _raw(client.completions, model=model, prompt=PROBE_TEXT, echo=True, logprobs=k, max_tokens=1,
                    temperature=0)  # fmt: skip
        parse_completion(body, k, echo_prompt=PROBE_TEXT)
    except ShiftedScoresError as exc:
        report.scores_aligned = False
        report.modes[mode] = "no (scores shifted by one position)"
        report.problems.append(str(exc))
    except (openai.OpenAIError, ResponseShapeError) as exc:
        _failed(report, mode, exc)
    else:
        report.scores_aligned = True
        report.modes[mode] = "ok"


def _probe_prompt_logprobs(client: openai.OpenAI, model: str, k: int, report: CheckReport) -> None:
    mode = "score: prompt_logprobs"
    try:
        body = _raw(client.completions, model=model, prompt=PROBE_TEXT, max_tokens=1, temperature=0,
                    extra_body={"prompt_logprobs": k})  # fmt: skip
        raw = body["choices"][0].get("prompt_logprobs")
        report.modes[mode] = "ok" if isinstance(raw, list) and len(raw) > 1 else "no (not in the answer)"
    except (openai.OpenAIError, KeyError, IndexError, TypeError) as exc:
        _failed(report, mode, exc)


def _probe_chat(client: openai.OpenAI, model: str, k: int, report: CheckReport) -> None:
    mode = "generate: chat"
    try:
        body = _raw(client.chat.completions, model=model, messages=[{"role": "user", "content": PROBE_TEXT}],
                    logprobs=True, top_logprobs=k, max_tokens=4, temperature=0)  # fmt: skip
        parse_chat(body, k)
    except (openai.OpenAIError, ResponseShapeError) as exc:
        _failed(report, mode, exc)
        return
    report.modes[mode] = "ok"
    content = body["choices"][0]["logprobs"]["content"]
    report.token_bytes = bool(content) and all(isinstance(e.get("bytes"), list) for e in content)


def _probe_ids(client: openai.OpenAI, model: str, report: CheckReport) -> None:
    try:
        body = _raw(client.completions, model=model, prompt=PROBE_TEXT, logprobs=1, max_tokens=2, temperature=0,
                    extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
        tokens = (body["choices"][0].get("logprobs") or {}).get("tokens") or []
    except (openai.OpenAIError, KeyError, IndexError, TypeError):
        return
    report.token_ids = bool(tokens) and all(str(t).startswith("token_id:") for t in tokens)
