"""Faults injected by a real proxy process between the real ``openai`` client and the real teacher server.

The run through the faults stores exactly the dataset of a fault-free run; requests that exhaust their retries
are returned (and stored in the catalog) with their reasons.
"""

from __future__ import annotations

from pathlib import Path

from storage.catalog import Catalog
from storage.settings import StorageSettings
from storage.shards import ShardWriter
from teacher.collect import CollectResult, collect
from teacher.inputs import WorkItem
from teacher.settings import TeacherSettings
from tests.teacher.conftest import (
    PLANTED_KEY,
    PROMPTS,
    Teacher,
    assert_same_dataset,
    fault_proxy,
    stored_records,
)

FAULTS = ["429", "500", "503", "slow", "drop", "malformed", "nologprobs"]


def collect_into(
    data_dir: Path, teacher: Teacher, base_url: str, items: list[WorkItem], **overrides
) -> CollectResult:
    settings = TeacherSettings(
        model="local-teacher", mode="score", score_api="prompt_logprobs", top_k=4, concurrency=2, **overrides
    )
    with Catalog(data_dir) as catalog:
        writer = ShardWriter(data_dir, StorageSettings(data_dir=data_dir, shard_max_records=3), catalog)
        with writer:
            result = collect(
                items, settings, base_url, PLANTED_KEY, set(), writer,
                progress=False, resolve=teacher.tokenizer.token_bytes,
            )  # fmt: skip
        catalog.record_failures([(f.sample_id, f.reason) for f in result.failures])
    return result


def test_every_fault_is_retried_to_the_fault_free_dataset(teacher: Teacher, tmp_path: Path) -> None:
    items = [WorkItem(prompt=p) for p in PROMPTS]
    clean = collect_into(tmp_path / "clean", teacher, teacher.base_url, items)
    assert not clean.failures
    plan = {"sequence": FAULTS, "retry_after_s": 1, "slow_s": 4}
    with fault_proxy(teacher.origin, plan) as proxy:
        faulty = collect_into(tmp_path / "faulty", teacher, proxy.base_url, items, timeout_s=2, max_retries=4)
        stats = proxy.stats()
    assert stats["faults"] == dict.fromkeys(FAULTS, 1), stats
    assert not faulty.failures, faulty.failures
    assert faulty.collected == len(items)
    assert_same_dataset(stored_records(tmp_path / "clean"), stored_records(tmp_path / "faulty"))


def test_exhausted_retries_are_listed_with_reasons(teacher: Teacher, tmp_path: Path) -> None:
    items = [WorkItem(prompt=p) for p in PROMPTS[:3]]
    items += [WorkItem(prompt="XPOISON-A always 503"), WorkItem(prompt="XPOISON-B never has logprobs")]
    plan = {"match": {"XPOISON-A": "503", "XPOISON-B": "nologprobs"}, "retry_after_s": 0.1}
    with fault_proxy(teacher.origin, plan) as proxy:
        result = collect_into(tmp_path, teacher, proxy.base_url, items, max_retries=2)
        stats = proxy.stats()
    assert result.collected == 3
    reasons = {f.prompt: f.reason for f in result.failures}
    assert set(reasons) == {"XPOISON-A always 503", "XPOISON-B never has logprobs"}
    assert "503" in reasons["XPOISON-A always 503"] and "injected 503" in reasons["XPOISON-A always 503"]
    assert "no prompt_logprobs although they were asked for" in reasons["XPOISON-B never has logprobs"]
    assert stats["faults"] == {"503": 3, "nologprobs": 3}  # first try + max_retries, each
    with Catalog(tmp_path) as catalog:
        stored_failures = {key: reason for key, reason, _ in catalog.failures()}
    assert stored_failures == {f.sample_id: f.reason for f in result.failures}
    assert len(stored_records(tmp_path)) == 3


def test_html_502_pages_from_a_gateway_are_retried_and_named(teacher: Teacher, tmp_path: Path) -> None:
    """A proxy's HTML "502 Bad Gateway" page is retried like any 5xx; one that never stops is reported with the
    URL and the page's own words, not as a JSON decoding error."""
    items = [WorkItem(prompt=p) for p in PROMPTS[:4]]
    clean = collect_into(tmp_path / "clean", teacher, teacher.base_url, items)
    assert not clean.failures
    poison = WorkItem(prompt="XPOISON behind a broken gateway")
    # the first two POSTs are the first tries of items 0 and 1 (the poisoned item is asked last)
    plan = {"sequence": ["html502", "html502"], "match": {"XPOISON": "html502"}}
    with fault_proxy(teacher.origin, plan) as proxy:
        result = collect_into(tmp_path / "faulty", teacher, proxy.base_url, [*items, poison], max_retries=2)
        stats = proxy.stats()
    assert stats["faults"] == {"html502": 2 + 3}, (
        stats
    )  # two retried, then the poisoned one: 1 try + 2 retries
    assert result.collected == len(items)
    (failure,) = result.failures
    assert failure.prompt == poison.prompt
    assert f"{proxy.base_url}/completions" in failure.reason and "502 Bad Gateway" in failure.reason
    assert "text/html" in failure.reason  # the page itself, quoted
    assert "JSON" not in failure.reason and "Traceback" not in failure.reason, failure.reason
    assert_same_dataset(stored_records(tmp_path / "clean"), stored_records(tmp_path / "faulty"))
