"""Importers of teacher data people already have, into the same ``TopKRecord`` + ``TeacherVocab`` as collection.

- OpenAI Batch API output (JSONL): ``{"custom_id", "response": {"status_code", "body": <chat completion>},
  "error"}`` per line; the prompts come from the batch's input file (``{"custom_id", "body": {"messages",
  ...}}``) when given. Lines whose request failed are returned as failures, not records.
- metaseq soft-distillation JSONL (the seed project's format): ``{"src" | "prompt_text", "tgt"?,
  "beam_results": [{"generated_text"?, "tokens"?, "top_logprobs": [{token_text: {"token_id",
  "logprob_score"}}, ...]}]}``: per generated position, the top-k keyed by token text. The token actually
  generated is ``tokens[i]`` when given, else the candidate that continues the generated text (``generated_text``
  or ``tgt``), else the most likely one.

Without the Batch input file the prompts are unknown: records are then stored completion-only (empty prompt,
``params["prompt"] = "unknown"``, the sample id hashed from the custom_id); a prompt is never invented.
Log-probabilities must be <= 0 (``teacher.parsing.check_logprob``). Every malformed line raises ``InputError``
naming ``file:line`` and what was expected, never a bare traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.records import TeacherVocab, TopKRecord
from teacher.collect import build_record
from teacher.inputs import InputError, decode_json_line, item_from_object
from teacher.parsing import (
    Parsed,
    ResponseShapeError,
    Token,
    check_logprob,
    decode_token_string,
    parse_chat,
    top_k,
)

MALFORMED = (ResponseShapeError, ValueError, TypeError, KeyError, AttributeError, IndexError)

FORMATS = ("openai-batch", "metaseq")


@dataclass
class ImportResult:
    records: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (custom id / line, reason)


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """``(file:line, decoded object)`` for each non-empty line; a line that is not JSON is an error."""
    with path.open("rb") as handle:  # decoded line by line, so a bad byte is reported on its own line
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            yield where, decode_json_line(raw, where)


def _batch_prompts(requests: Path) -> dict[str, tuple[str, dict]]:
    """custom_id -> (prompt as stored, request body) from a Batch input file."""
    prompts = {}
    for where, obj in _json_lines(requests):
        body = obj.get("body") if isinstance(obj, dict) else None
        if not isinstance(body, dict) or not isinstance(obj.get("custom_id"), str):
            raise InputError(f"{where}: expected {{'custom_id': str, 'body': {{'messages': [...]}}}}")
        prompts[obj["custom_id"]] = (item_from_object(body, where).prompt_text(), body)
    return prompts


def import_openai_batch(
    output: Path, vocab: TeacherVocab, requests: Path | None = None, split: str = "train"
) -> Iterator[TopKRecord | tuple[str, str]]:
    """Records (or ``(custom_id, reason)`` failures) from a Batch output file of chat completions."""
    prompts = _batch_prompts(requests) if requests is not None else {}
    for where, obj in _json_lines(output):
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            raise InputError(f"{where}: expected an object with a string 'custom_id'")
        custom_id = obj["custom_id"]
        response = obj.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        if obj.get("error") or not isinstance(response, dict) or response.get("status_code") != 200:
            error = obj.get("error") or (body.get("error") if isinstance(body, dict) else None)
            yield custom_id, f"batch request failed: {json.dumps(error)[:300]}"
            continue
        if not isinstance(body, dict):
            raise InputError(f"{where}: expected 'response.body' as a chat completion object, got {body!r}")
        if requests is not None and custom_id not in prompts:
            raise InputError(f"{where}: custom_id {custom_id!r} is not in {requests}")
        try:
            yield _batch_record(body, custom_id, prompts.get(custom_id), split, vocab)
        except MALFORMED as exc:
            raise InputError(f"{where}: {exc}") from None


def _batch_record(
    body: dict, custom_id: str, known: tuple[str, dict] | None, split: str, vocab: TeacherVocab
) -> TopKRecord:
    prompt, request = known if known is not None else ("", {})
    k = int(request.get("top_logprobs") or 20)
    parsed = parse_chat(body, k)
    params = {
        "mode": "generate", "api": "chat", "top_k": k, "source": "openai-batch",
        "temperature": request.get("temperature", 1.0),
        "max_tokens": request.get("max_tokens", request.get("max_completion_tokens")),
    }  # fmt: skip
    if known is None:
        params["prompt"] = "unknown"
    model = body.get("model") or request.get("model") or "openai"
    key = prompt if known is not None else f"openai-batch custom_id {custom_id}"
    record = build_record(parsed, key, split, model, "generate", params, vocab)
    if known is None:
        record.prompt = ""  # unknown without the Batch input file: the key only names the sample
    created = body.get("created")
    if isinstance(created, (int, float)) and not isinstance(created, bool):
        record.created_at = float(created)  # the answer's time: a re-import is the same record
    return record


def _metaseq_position(entry: Any, where: str) -> list[Token]:
    if not isinstance(entry, dict) or not entry:
        raise InputError(f"{where}: expected an object {{token_text: {{token_id, logprob_score}}}}")
    out = []
    for text, value in entry.items():
        at = f"{where}[{text!r}]"
        expected = "expected {'token_id': int, 'logprob_score': a number <= 0}"
        if not isinstance(value, dict) or "logprob_score" not in value:
            raise InputError(f"{at}: {expected}")
        score, token_id = value["logprob_score"], value.get("token_id")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InputError(f"{at}: {expected}, got logprob_score {score!r}")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
            raise InputError(f"{at}: {expected}, got token_id {token_id!r}")
        try:
            data, _ = decode_token_string(text)
            logprob = check_logprob(float(score), "logprob_score")
        except ResponseShapeError as exc:
            raise InputError(f"{at}: {exc}") from None
        out.append(Token(data, token_id, logprob))
    return out


def _pick_actual(candidates: list[Token], rest: bytes | None, wanted: Any, where: str) -> Token:
    if wanted is not None:
        if not isinstance(wanted, str):
            raise InputError(f"{where}: expected the generated token as a string, got {wanted!r}")
        try:
            data = decode_token_string(wanted)[0]
        except ResponseShapeError as exc:
            raise InputError(f"{where}: {exc}") from None
        for c in candidates:
            if c.data == data:
                return c
        raise InputError(f"{where}: the generated token {wanted!r} is not among the position's top_logprobs")
    if rest is not None:
        matching = [c for c in candidates if c.data and rest.startswith(c.data)]
        if matching:
            return max(matching, key=lambda c: (len(c.data or b""), c.logprob))
        raise InputError(f"{where}: no top_logprobs entry continues the generated text")
    return max(candidates, key=lambda c: c.logprob)


def metaseq_record(obj: Any, where: str, teacher: str, vocab: TeacherVocab, split: str) -> TopKRecord:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    prompt = obj.get("prompt_text", obj.get("src"))
    if not isinstance(prompt, str):
        raise InputError(f"{where}: expected a string 'prompt_text' or 'src'")
    beams = obj.get("beam_results")
    if not isinstance(beams, list) or not beams or not isinstance(beams[0], dict):
        raise InputError(f"{where}: expected 'beam_results' as a non-empty list of objects")
    beam = beams[0]
    positions = beam.get("top_logprobs")
    if not isinstance(positions, list):
        raise InputError(f"{where}: expected 'beam_results[0].top_logprobs' as a list")
    target = beam.get("generated_text", obj.get("tgt"))
    rest = target.encode("utf-8") if isinstance(target, str) else None
    named = beam.get("tokens")
    if named is not None and (not isinstance(named, list) or len(named) != len(positions)):
        raise InputError(f"{where}: 'beam_results[0].tokens' must list one token per top_logprobs position")
    tokens, candidates = [], []
    for i, entry in enumerate(positions):
        at = f"{where}: beam_results[0].top_logprobs[{i}]"
        cands = _metaseq_position(entry, at)
        actual = _pick_actual(cands, rest, named[i] if named else None, at)
        if rest is not None and actual.data:
            rest = rest[len(actual.data) :]
        tokens.append(actual)
        candidates.append(top_k(cands, len(cands)))
    text = (
        target
        if isinstance(target, str)
        else b"".join(t.data or b"" for t in tokens).decode("utf-8", "replace")
    )
    params = {"mode": "generate", "top_k": max((len(c) for c in candidates), default=0), "source": "metaseq"}
    try:
        return build_record(
            Parsed(text, tokens, candidates), prompt, split, teacher, "generate", params, vocab
        )
    except MALFORMED as exc:
        raise InputError(f"{where}: {exc}") from None


def import_metaseq(
    path: Path, vocab: TeacherVocab, teacher: str = "metaseq-teacher", split: str = "train"
) -> Iterator[TopKRecord]:
    for where, obj in _json_lines(path):
        yield metaseq_record(
            obj, where, teacher, vocab, obj.get("split", split) if isinstance(obj, dict) else split
        )
