"""Real processes: a writer killed with SIGKILL mid-shard, two writers at once, the CLI, the benchmark."""

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage.catalog import Catalog
from storage.shards import TMP_SUFFIX, read_records, shard_dir
from tests.storage.factory import make_records
from tests.support import PYTHON, ROOT, run_bounded, test_env

WRITER = [PYTHON, "-m", "tests.storage.writer_process"]


def expected_ids(seed, count, length=400):
    return {r.sample_id for r in make_records(seed, count, start=seed * 100_000, max_len=length)}


def registered(data_dir):
    with Catalog(data_dir, sync=False) as catalog:
        shards = catalog.con.execute("SELECT name, rows FROM shards").fetchall()
        ids = [sid for (sid,) in catalog.con.execute("SELECT sample_id FROM records").fetchall()]
    return shards, ids


def test_sigkill_mid_shard_then_rerun_completes_without_duplicates(tmp_path):
    count = 160
    proc = subprocess.Popen(
        [*WRITER, str(tmp_path), "1", str(count), "--catalog", "--records-per-shard", "16"],
        cwd=ROOT,
        env=test_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # let two shards complete, then kill while the next one is being written
            if line.strip() == "flushed 2":
                break
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if any(shard_dir(tmp_path).glob(f"*{TMP_SUFFIX}")):
                break
            time.sleep(0.0005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    shards, ids = registered(tmp_path)
    assert len(shards) >= 2 and len(ids) < count
    for name, rows in shards:  # every registered shard is complete and readable
        assert len(read_records(shard_dir(tmp_path) / name)) == rows
    assert sum(rows for _, rows in shards) == len(ids) == len(set(ids))

    result = run_bounded(
        [*WRITER, str(tmp_path), "1", str(count), "--catalog", "--records-per-shard", "16"], 180
    )
    assert result.returncode == 0 and "finished" in result.stdout, result.stdout
    shards, ids = registered(tmp_path)
    assert len(ids) == len(set(ids)) == count
    assert set(ids) == expected_ids(1, count)
    for name, rows in shards:
        assert len(read_records(shard_dir(tmp_path) / name)) == rows


@pytest.mark.parametrize("point", ["tmp", "renamed"])
def test_killed_at_each_step_of_a_shard_write_the_catalog_lists_exactly_the_stored_ids(tmp_path, point):
    """A collector's re-run skips ``existing_sample_ids()``: after a SIGKILL at an exact point of a shard write
    (temp file complete but not renamed; renamed but not registered), reopening the catalog must report exactly
    the sample ids that complete shard files hold: none of the dead shard's if it was not renamed, all of them if
    it was (or the re-run would ask the teacher again for what is stored)."""
    count, per_shard = 40, 8
    killed = run_bounded(
        [*WRITER, str(tmp_path), "3", str(count), "--catalog", "--records-per-shard", str(per_shard)],
        120,
        env=test_env(WRITER_KILL_AT=f"{point}:2"),
    )
    assert killed.returncode == -signal.SIGKILL and "flushed 2\ndying" in killed.stdout, killed.stdout
    files = sorted(shard_dir(tmp_path).glob("*.parquet"))
    in_files = [r.sample_id for path in files for r in read_records(path)]
    assert len(in_files) == (2 if point == "tmp" else 3) * per_shard
    assert len(list(shard_dir(tmp_path).glob(f"*{TMP_SUFFIX}"))) == (point == "tmp")

    with Catalog(tmp_path) as catalog:  # what the re-run sees
        assert catalog.existing_sample_ids() == set(in_files)
        assert catalog.stats().temp_files == (point == "tmp")
    rerun = run_bounded(
        [*WRITER, str(tmp_path), "3", str(count), "--catalog", "--records-per-shard", str(per_shard)], 120
    )
    assert rerun.returncode == 0 and "finished" in rerun.stdout, rerun.stdout
    _, ids = registered(tmp_path)
    assert sorted(ids) == sorted(expected_ids(3, count))  # each sample once, none missing


def test_two_writer_processes_then_reindex(tmp_path):
    commands = [[*WRITER, str(tmp_path), str(seed), "60", "--records-per-shard", "7"] for seed in (2, 3)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda cmd: run_bounded(cmd, 180), commands))
    assert all(r.returncode == 0 for r in results), [r.stdout for r in results]
    assert not (tmp_path / "catalog.duckdb").exists()  # writers beside the owner never touch the catalog
    with Catalog(tmp_path, sync=False) as catalog:
        assert catalog.reindex() == 2 * 9
        ids = [sid for (sid,) in catalog.con.execute("SELECT sample_id FROM records").fetchall()]
        assert catalog.stats().duplicates == 0
    assert len(ids) == len(set(ids)) == 120
    assert set(ids) == expected_ids(2, 60) | expected_ids(3, 60)


def test_data_cli_stats_reindex_and_errors(tmp_path):
    result = run_bounded([*WRITER, str(tmp_path), "4", "20", "--records-per-shard", "6"], 120)
    assert result.returncode == 0, result.stdout
    distill = [str(Path(PYTHON).with_name("distill")), "data"]  # the installed console script
    missing = run_bounded([*distill, "stats", "--data-dir", str(tmp_path)], 120)
    assert missing.returncode == 2 and "catalog.duckdb" in missing.stdout and "reindex" in missing.stdout
    reindex = run_bounded([*distill, "reindex", "--data-dir", str(tmp_path)], 120)
    assert reindex.returncode == 0 and "4 shard" in reindex.stdout, reindex.stdout
    assert "train" in reindex.stdout and "bytes/token" in reindex.stdout  # reindex ends with the stats
    snap = run_bounded(
        [*distill, "snapshot", "train-set", "--split", "train", "--data-dir", str(tmp_path)], 120
    )
    assert snap.returncode == 0, snap.stdout
    manifest = json.loads((tmp_path / "snapshots" / "train-set.json").read_text())
    assert manifest["samples"] == 20 and manifest["content_hash"] in snap.stdout
    victim = next(shard_dir(tmp_path).glob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:100])
    broken = run_bounded([*distill, "reindex", "--data-dir", str(tmp_path)], 120)
    assert broken.returncode == 2 and victim.name in broken.stdout and "Traceback" not in broken.stdout


def test_benchmark_quick_writes_results(tmp_path):
    out = tmp_path / "storage.json"
    result = run_bounded([PYTHON, "benchmarks/storage.py", "--quick", "--output", str(out)], 280)
    assert result.returncode == 0, result.stdout[-3000:]
    results = json.loads(out.read_text())
    keys = {"bytes_per_token", "kl_mean", "kl_max", "reader_tokens_per_s"}
    keys |= {"bytes_per_token_int32_f32", "bytes_per_token_int32_f16", "plain_read_tokens_per_s_int32_f32"}
    for name in ("real", "smollm2", "zipf200k"):
        assert keys <= set(results[name]), results
        assert results[name]["bytes_per_token"] < results[name]["bytes_per_token_int32_f16"]
        assert results[name]["kl_max"] < 1e-3
