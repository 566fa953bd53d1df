"""Several teacher endpoints: two real local teacher servers, one behind the fault proxy dying midway.

Every prompt is stored exactly once (counted in the raw shards), the dead endpoint's share moves to the other,
and the per-endpoint counts say so. Bad endpoint entries in a config are refused with the key and the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from storage.catalog import Catalog
from storage.records import sample_id
from storage.settings import StorageSettings
from storage.shards import ShardWriter
from teacher.client import request_params
from teacher.collect import CollectResult, collect
from teacher.inputs import WorkItem
from teacher.server import RunningServer, local_teacher_server
from teacher.settings import LocalTeacherSettings, TeacherSettings
from tests.teacher.conftest import (
    PLANTED_KEY,
    PROMPTS,
    TEACHER_MODEL,
    TEACHER_SEED,
    Teacher,
    assert_same_dataset,
    fault_proxy,
    stored_records,
)

ANSWERED_BEFORE_DYING = 3


@pytest.fixture(scope="module")
def second_server(teacher: Teacher) -> Iterator[RunningServer]:
    """A second replica: the same seeded model and tokenizer as the session's teacher, its own process."""
    settings = LocalTeacherSettings(api_key=PLANTED_KEY, max_batch_size=8, batch_wait_ms=2)
    with local_teacher_server(
        settings, random_init=TEACHER_MODEL, tokenizer=teacher.tokenizer_path, seed=TEACHER_SEED
    ) as server:
        yield server


def collect_into(
    data_dir: Path, teacher: Teacher, settings: TeacherSettings, items: list[WorkItem]
) -> CollectResult:
    with Catalog(data_dir) as catalog:
        writer = ShardWriter(data_dir, StorageSettings(data_dir=data_dir, shard_max_records=4), catalog)
        with writer:
            return collect(
                items, settings, settings.base_url, PLANTED_KEY, set(), writer,
                progress=False, resolve=teacher.tokenizer.token_bytes,
            )  # fmt: skip


def test_a_dying_endpoint_is_set_aside_and_the_other_takes_its_share(
    teacher: Teacher, second_server: RunningServer, tmp_path: Path
) -> None:
    items = [WorkItem(prompt=f"{p} #{n}") for n in range(3) for p in PROMPTS]  # 24 distinct prompts
    common = {"model": "local-teacher", "mode": "score", "score_api": "prompt_logprobs", "top_k": 4}
    plan = {"fail_after": ANSWERED_BEFORE_DYING, "fail_with": "503"}
    with fault_proxy(teacher.origin, plan) as proxy:
        settings = TeacherSettings(
            **common,
            endpoints=[
                {"base_url": proxy.base_url, "concurrency": 2},
                {"base_url": second_server.base_url, "concurrency": 2, "requests_per_minute": 60_000},
            ],
            max_retries=1,
            breaker_failures=2,
            breaker_cooldown_s=600,  # not back within the test
        )
        result = collect_into(tmp_path / "two", teacher, settings, items)
        stats = proxy.stats()

    assert not result.failures, result.failures
    assert result.collected == result.requested == len(items)
    params = request_params(settings)
    expected = {sample_id(item.prompt_text(), "local-teacher", params) for item in items}
    stored = Counter(r.sample_id for r in stored_records(tmp_path / "two"))  # the raw shards, duplicates kept
    assert set(stored) == expected and set(stored.values()) == {1}, stored.most_common(3)
    with Catalog(tmp_path / "two") as catalog:
        assert catalog.existing_sample_ids("local-teacher", params) == expected

    dying, healthy = result.endpoints[proxy.base_url], result.endpoints[second_server.base_url]
    assert stats["forwarded"] == ANSWERED_BEFORE_DYING  # the proxy passed 3, then failed everything
    assert dying.requests - dying.failures == ANSWERED_BEFORE_DYING
    assert dying.set_aside == 1  # and stayed aside: no probe within the cool-down
    assert 2 <= dying.failures <= 2 + 2 * 2  # the failures that tripped the breaker, plus those in flight
    assert healthy.failures == 0 and healthy.set_aside == 0
    assert healthy.requests == len(items) - ANSWERED_BEFORE_DYING  # the dead endpoint's share moved over
    assert dying.tokens > 0 and healthy.tokens > dying.tokens

    # What was stored through two replicas is what one healthy replica gives.
    single = TeacherSettings(**common, base_url=teacher.base_url)
    assert not collect_into(tmp_path / "one", teacher, single, items).failures
    assert_same_dataset(stored_records(tmp_path / "one"), stored_records(tmp_path / "two"))


def test_a_list_of_urls_spreads_requests_over_both(
    teacher: Teacher, second_server: RunningServer, tmp_path: Path
) -> None:
    items = [WorkItem(prompt=f"{p} list") for p in PROMPTS]
    settings = TeacherSettings(
        model="local-teacher",
        mode="score",
        top_k=2,
        concurrency=1,
        base_url=[teacher.base_url, second_server.base_url],
    )
    result = collect_into(tmp_path, teacher, settings, items)
    assert not result.failures and result.collected == len(items)
    counts = {url: s.requests for url, s in result.endpoints.items()}
    assert set(counts) == {teacher.base_url, second_server.base_url}
    assert sum(counts.values()) == len(items) and min(counts.values()) >= 2, counts


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('{ base_url = "http://127.0.0.1:8000/v1", concurency = 4 }', "concurency"),
        ('{ base_url = "127.0.0.1:8000/v1" }', "expected an http(s) URL"),
        ("{ concurrency = 4 }", "base_url"),
    ],
)
def test_bad_endpoint_entries_are_named(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[teacher]\nendpoints = [{entry}]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "teacher.endpoints" in text and message in text, text


def test_endpoints_and_base_url_lists_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        TeacherSettings(base_url="http://a:1/v1", endpoints=[{"base_url": "http://b:1/v1"}])
    with pytest.raises(ValueError, match="listed twice"):
        TeacherSettings(base_url=["http://a:1/v1", "http://a:1/v1"])
    with pytest.raises(ValueError, match=r"teacher.base_url\[1\]: expected an http\(s\) URL"):
        TeacherSettings(base_url=["http://a:1/v1", "local"])
    settings = TeacherSettings(
        endpoints=[{"base_url": "http://a:1/v1", "concurrency": 3}, {"base_url": "http://b:1/v1"}]
    )
    assert settings.base_url == ["http://a:1/v1", "http://b:1/v1"]
    resolved = settings.endpoint_settings(settings.base_url)
    assert [e.concurrency for e in resolved] == [3, settings.concurrency]
    assert TeacherSettings.model_validate(settings.model_dump()) == settings  # a dumped config loads again
