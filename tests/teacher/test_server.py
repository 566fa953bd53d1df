"""The local teacher server as a real subprocess, through the real ``openai`` client.

The reference for every logprob is independent of the server: a separate process builds a seeded model with
``student.inference``, writes its full logits and saves it as a checkpoint, which the server then serves; the
test takes the log-softmax of the reference logits itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest

from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer
from teacher.server import RunningServer, local_teacher_server
from teacher.settings import LocalTeacherSettings
from tests.student.worker_inference_tokenizer import train_tokenizer
from tests.support import PYTHON, ROOT, run_bounded, test_env

KEY = "sk-test-server-4c1d2e3f"
MODEL = ModelSettings(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=96)
SEED = 5
NAME = "local-teacher"
# scored texts; the second one's characters split across byte-level tokens
TEXTS = ["def parse(argv):\n    return argv[1:]\n", "naïve café — 日本語 ✓ 🙂"]

pytestmark = pytest.mark.slow


@dataclass
class Served:
    server: RunningServer
    client: openai.OpenAI
    tokenizer: StudentTokenizer
    reference: list[np.ndarray]  # full logits [len, V] of each of TEXTS, from the independent process


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The server serves the checkpoint that the reference process saved of its seeded model."""
    folder = tmp_path_factory.mktemp("server")
    tokenizer_path = train_tokenizer(folder / "tokenizer.json")
    out, checkpoint = folder / "reference.json", folder / "checkpoint"
    worker = [
        PYTHON,
        "tests/student/worker_inference_run.py",
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer_path),
    ]
    worker += [
        "--model-json",
        MODEL.model_dump_json(),
        "--seed",
        str(SEED),
        "--prompts-json",
        json.dumps(TEXTS),
    ]
    done = run_bounded([*worker, "--save-checkpoint", str(checkpoint)], timeout=180)
    assert done.returncode == 0, done.stdout[-4000:]
    reference = [np.array(x, dtype=np.float64) for x in json.loads(out.read_text())["logits"]]
    settings = LocalTeacherSettings(api_key=KEY, max_batch_size=8, batch_wait_ms=200)
    with local_teacher_server(settings, checkpoint=checkpoint) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
        yield Served(server, client, StudentTokenizer.load(tokenizer_path), reference)


def test_models_list(served: Served) -> None:
    models = served.client.models.list()
    assert [m.id for m in models.data] == [NAME]


@pytest.mark.parametrize("k", range(1, 21))
def test_completion_logprobs_k(served: Served, k: int) -> None:
    r = served.client.completions.create(
        model=NAME,
        prompt=TEXTS[0],
        max_tokens=3,
        temperature=0,
        logprobs=k,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3 == r.usage.completion_tokens
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == k  # keyed by distinct ids, so exactly k entries
        values = list(top.values())
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the chosen token is the most likely one
        assert token == next(iter(top)) and token_lp == pytest.approx(values[0])
    assert r.usage.prompt_tokens == len(served.tokenizer.encode(TEXTS[0]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 3


def test_echo_scores_prompt_like_reference_forward(served: Served) -> None:
    """echo + logprobs, with max_tokens=0: the prompt's logprobs equal log_softmax of the independent forward."""
    for text, logits in zip(TEXTS, served.reference, strict=True):
        ids = served.tokenizer.encode(text)
        r = served.client.completions.create(
            model=NAME,
            prompt=text,
            max_tokens=0,
            echo=True,
            logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, "return_logits": True},
        )
        choice = r.choices[0]
        assert choice.text == text and r.usage.completion_tokens == 0
        lp = choice.logprobs
        assert lp.tokens == [f"token_id:{t}" for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = _log_softmax(logits)
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]], abs=1e-4)
            top_ids = np.argsort(-ref[i - 1], kind="stable")[:5]
            got = {int(key.split(":")[1]): v for key, v in lp.top_logprobs[i].items()}
            assert set(got) == set(top_ids.tolist())
            for t, v in got.items():
                assert v == pytest.approx(ref[i - 1, t], abs=1e-4)
            raw = {int(key.split(":")[1]): v for key, v in lp.model_extra["top_logits"][i].items()}
            for t, v in raw.items():
                assert v == pytest.approx(logits[i - 1, t], abs=1e-4)


def test_unicode_bytes_reassemble_text(served: Served) -> None:
    """Tokens that split a character show U+FFFD as text, but their bytes give back the exact text."""
    text = TEXTS[1]
    r = served.client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    ids = served.tokenizer.encode(text)
    pieces = [served.tokenizer.token_bytes(t) for t in ids]
    assert any(not _valid_utf8(p) for p in pieces), "the tokenizer should split some characters"
    assert "\ufffd" in "".join(lp.tokens)
    assert b"".join(pieces).decode() == text
    # text_offset: characters of the text before each token's first byte
    for offset, i in zip(lp.text_offset, range(len(ids)), strict=True):
        assert offset == len(b"".join(pieces[:i]).decode("utf-8", errors="ignore"))
    chat = served.client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": text}],
        max_tokens=8,
        seed=1,
        logprobs=True,
        top_logprobs=3,
        extra_body={"prompt_logprobs": 0},
    )
    content = chat.choices[0].logprobs.content
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == chat.choices[0].message.content
    # the prompt, rendered with the chat template, is spelled exactly by its prompt_logprobs tokens
    rendered = f"<|user|>\n{text}\n<|assistant|>\n"
    prompt_lp = chat.model_extra["prompt_logprobs"]
    assert prompt_lp[0] is None and len(prompt_lp) == chat.usage.prompt_tokens
    assert chat.usage.prompt_tokens == len(served.tokenizer.encode(rendered))


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_prompt_logprobs_extension(served: Served) -> None:
    text, logits = TEXTS[0], served.reference[0]
    ids = served.tokenizer.encode(text)
    r = served.client.completions.create(
        model=NAME, prompt=text, max_tokens=1, extra_body={"prompt_logprobs": 3}
    )
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    ref = _log_softmax(logits)
    for i in range(1, len(ids)):
        entry, row, actual_id = plp[i], ref[i - 1], ids[i]
        actual = entry[str(actual_id)]
        assert actual["logprob"] == pytest.approx(row[actual_id], abs=1e-4)
        assert (
            1 + (row > row[actual_id] + 1e-5).sum()
            <= actual["rank"]
            <= 1 + (row > row[actual_id] - 1e-5).sum()
        )
        assert actual["decoded_token"] == served.tokenizer.token_bytes(actual_id).decode(
            "utf-8", errors="replace"
        )
        top3 = np.argsort(-row, kind="stable")[:3].tolist()
        assert {str(t) for t in top3} <= entry.keys()
        assert [entry[str(t)]["rank"] for t in top3] == [1, 2, 3]
        assert len(entry) == (3 if actual_id in top3 else 4)


def test_chat_top_logprobs_and_logits(served: Served) -> None:
    r = served.client.chat.completions.create(
        model=NAME,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
        extra_body={"return_logits": True},
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 5 == r.usage.completion_tokens
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 20
        assert entry.token == entry.top_logprobs[0].token and entry.bytes == entry.top_logprobs[0].bytes
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        logits = entry.model_extra["top_logits"]
        shift = [lg["logit"] - tl.logprob for lg, tl in zip(logits, entry.top_logprobs, strict=True)]
        assert max(shift) - min(shift) < 1e-4  # logit - logprob = logsumexp, the same for the whole row
    joined = b"".join(bytes(e.bytes) for e in choice.logprobs.content)
    assert joined.decode("utf-8", errors="replace") == choice.message.content


def test_seeded_sampling_is_deterministic_and_stops(served: Served) -> None:
    def sample(seed: int, **kw) -> openai.types.Completion:
        return served.client.completions.create(
            model=NAME, prompt=TEXTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed, **kw
        )

    a, b, c = sample(7), sample(7), sample(8)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == "length"
    assert a.choices[0].text != c.choices[0].text
    text = a.choices[0].text
    stop = next(ch for ch in text[1:] if ch != "\ufffd")
    cut = sample(7, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_auth_rejected(served: Served) -> None:
    bad = openai.OpenAI(base_url=served.server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and KEY not in str(err.value)
    r = httpx.post(f"{served.server.base_url}/completions", json={"model": NAME, "prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": NAME, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
        ({"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"model": NAME, "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ({"model": NAME, "prompt": ""}, 400, "prompt"),
        ({"model": NAME, "prompt": [99999]}, 400, "prompt"),
        (
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
    ],
)
def test_bad_requests(served: Served, body: dict, status: int, param: str) -> None:
    path = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(
        f"{served.server.base_url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_request_through_openai_client(served: Served) -> None:
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model=NAME, prompt="x", logprobs=25)
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])


def test_concurrent_requests_are_batched(served: Served) -> None:
    """Eight requests sent together run in shared forward passes, and each gets the answer it gets alone."""
    before = served.server.metrics()

    def ask(i: int):
        return served.client.completions.with_raw_response.create(
            model=NAME, prompt=TEXTS[i % 2], max_tokens=4, temperature=0.7, seed=i, logprobs=2
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        raws = list(pool.map(ask, range(8)))
    after = served.server.metrics()
    assert after["requests"] - before["requests"] == 8
    assert after["max_batch_size"] > 1
    assert max(int(raw.headers["x-batch-size"]) for raw in raws) > 1
    for i, raw in enumerate(raws):
        alone = ask(i).parse()
        batched = raw.parse()
        assert batched.choices[0].text == alone.choices[0].text
        for x, y in zip(
            batched.choices[0].logprobs.token_logprobs, alone.choices[0].logprobs.token_logprobs, strict=True
        ):
            assert math.isclose(x, y, abs_tol=1e-4)


def test_prompt_list_and_token_ids(served: Served) -> None:
    r = served.client.completions.create(model=NAME, prompt=TEXTS, max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    lengths = [len(served.tokenizer.encode(t)) for t in TEXTS]
    assert r.usage.prompt_tokens == sum(lengths) and r.usage.completion_tokens == 4
    ids = served.tokenizer.encode(TEXTS[0])
    by_ids = served.client.completions.create(model=NAME, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert by_ids.choices[0].text == TEXTS[0] + r.choices[0].text


def test_command_line_help() -> None:
    """``python -m teacher.server --help`` documents the command line without loading a model."""
    proc = run_bounded([PYTHON, "-m", "teacher.server", "--help"], timeout=60)
    assert proc.returncode == 0
    for flag in ("--checkpoint", "--random-init", "--max-batch-size", "--inject-latency-ms", "--api-key-env"):
        assert flag in proc.stdout


def test_server_stops_when_its_starter_is_killed(tmp_path: Path) -> None:
    """A starter killed with SIGKILL runs no cleanup; the server notices its parent is gone and exits."""
    tokenizer_path = train_tokenizer(tmp_path / "tokenizer.json")
    starter_code = (
        "import sys, time\nfrom pathlib import Path\n"
        "from student.settings import ModelSettings\nfrom teacher.server import local_teacher_server\n"
        "from teacher.settings import LocalTeacherSettings\n"
        f"model = ModelSettings.model_validate_json({MODEL.model_dump_json()!r})\n"
        f"with local_teacher_server(LocalTeacherSettings(), tokenizer=Path({str(tokenizer_path)!r}), "
        "random_init=model) as server:\n"
        "    print(server.process.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    starter = subprocess.Popen(
        [PYTHON, "-c", starter_code], cwd=ROOT, env=test_env(), stdout=subprocess.PIPE, text=True
    )
    server_pid = None
    try:
        server_pid = int(starter.stdout.readline())
        server = psutil.Process(server_pid)
        assert "teacher.server" in " ".join(server.cmdline())
        starter.kill()
        starter.wait(timeout=10)
        psutil.wait_procs([server], timeout=30)
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, (
            "server outlived its starter"
        )
    finally:
        if starter.poll() is None:
            starter.kill()
        if server_pid is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(server_pid).kill()
