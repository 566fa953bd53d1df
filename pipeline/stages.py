"""The pipeline's stages: pure Python, no Prefect. Each function returns a ``StageSpec`` (name, cache key, builder).

A key hashes the config section(s) the stage reads, the content hashes of the files it consumes and the code
version of the packages it runs (``pipeline.cache.stage_key``). The DAG (``pipeline.runner``)::

    prepare_corpus ── tokenizer ── bootstrap_teacher (embedded default only)
          │               │                │
          └───────────────┼────────────────┴── collect ── snapshot ──┬── train_soft ──┬── evaluate ── report
                          └──────────────────────────────────────────┴── train_hard ──┘

(one ``train_<student>`` per ``[evaluate] seeds`` entry: ``train_<student>_s<seed>`` after the first seed).

``prepare_corpus`` writes two files: ``samples.jsonl`` (what the teacher is asked about: the corpus section's
source) and ``base.jsonl`` (standard-library text the tokenizer and the bootstrap teacher learn from). Keys hash
them separately, so adding prompts to a prompt file re-runs collect for the new prompts only and never retrains
the tokenizer or the teacher.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.cache import StageResult, StageSpec, hash_file, hash_tree, hash_value, stage_key
from pipeline.config import DistillConfig

Log = Callable[[str], None]
Progress = Callable[[str, float], None]  # (what, percent 0..100)

PERCENT = re.compile(r"(\d{1,3})%\|")  # a tqdm bar: " 45%|####      | 45/100"
TRAIN_MODULE = "student.train"
EVALUATE_MODULE = "student.evaluate"
# Teacher settings that change how fast data arrives, not what it is: kept out of the collect key.
TRANSPORT_FIELDS = frozenset(
    {
        "concurrency",
        "requests_per_minute",
        "tokens_per_minute",
        "timeout_s",
        "max_retries",
        "on_bad_line",
        "max_failed_fraction",
        "endpoints",
        "breaker_failures",
        "breaker_cooldown_s",
        "http_transport",
    }
)


@dataclass
class Context:
    """What every stage needs besides its inputs: the config, where outputs go, and where to report."""

    config: DistillConfig
    log: Log = print
    progress: Progress | None = None
    env: dict[str, str] | None = None  # environment of launched subprocesses (None: inherit)
    # runs collection partitions ([collect] workers > 1); None: a Dask cluster (pipeline.collect_workers)
    partition_runner: Callable[..., None] | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.config.run.work_dir)

    def report_progress(self, what: str, percent: float) -> None:
        if self.progress is not None:
            self.progress(what, percent)


BUNDLED_TEACHERS = ("smollm2",)


def uses_bootstrap_teacher(config: DistillConfig) -> bool:
    """The test suite's teacher: a tiny local teacher trained here (``local_teacher.model = 'bootstrap'``)."""
    return config.teacher.base_url == "local" and config.local_teacher.model == "bootstrap"


def local_teacher_gguf(config: DistillConfig) -> Path | None:
    """The GGUF file the local teacher is converted from (the bundled SmolLM2 or a path), else None."""
    model = config.local_teacher.model
    if config.teacher.base_url != "local":
        return None
    if model == "smollm2":
        from student.gguf_import import bundled_smollm2_gguf

        return bundled_smollm2_gguf()
    return Path(model) if model.endswith(".gguf") else None


# ---------------------------------------------------------------------------------------------- corpus


def prepare_corpus(ctx: Context) -> StageSpec:
    from pipeline import corpus

    settings = ctx.config.corpus
    seed = ctx.config.run.seed
    on_bad_line = ctx.config.teacher.on_bad_line

    def build(out: Path, resume: bool) -> dict[str, Any]:
        base_settings = settings.model_copy(update={"source": "stdlib", "paths": []})
        base = corpus.stdlib_items(base_settings, seed)
        items = base if settings.source == "stdlib" else corpus.file_items(settings, seed, on_bad_line)
        corpus.write_items(items, out / "samples.jsonl")
        corpus.write_items(base, out / "base.jsonl")
        ctx.log(f"corpus: {len(items)} samples {corpus.split_counts(items)}; {len(base)} base chunks")
        return {"samples": corpus.split_counts(items), "base": corpus.split_counts(base)}

    key = stage_key(
        "prepare_corpus",
        {"corpus": settings, "seed": seed, "on_bad_line": on_bad_line},
        corpus.source_fingerprint(settings),
        ["pipeline.corpus", "teacher.inputs"],
    )
    return StageSpec("prepare_corpus", key, build)


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer(
    ctx: Context, corpus_result: StageResult, teacher_result: StageResult | None = None
) -> StageSpec:
    """The student's tokenizer: trained on the corpus, a given file, or the local teacher's own."""
    settings = ctx.config.tokenizer
    source = None
    if settings.source == "teacher":
        teacher_dir = teacher_checkpoint(ctx.config, teacher_result)
        if teacher_dir is None:
            raise ValueError(
                "tokenizer.source = 'teacher' needs a local teacher (teacher.base_url = 'local')"
            )
        source = teacher_dir / "tokenizer.json"
    elif settings.path is not None:
        source = Path(settings.path)

    def build(out: Path, resume: bool) -> dict[str, Any]:
        from pipeline.corpus import read_items
        from student.tokenizer import StudentTokenizer

        if source is not None:
            tok = StudentTokenizer.load(source)
        else:
            texts = [item.prompt_text() for item in read_items(corpus_result.file("base.jsonl"), ["train"])]
            tok = StudentTokenizer.train(texts, settings.vocab_size)
        tok.save(out / "tokenizer.json")
        ctx.log(f"tokenizer: vocabulary of {tok.vocab_size} ({settings.source})")
        return {"vocab_size": tok.vocab_size, "source": settings.source}

    inputs = (
        {"file": hash_file(source)} if source is not None else {"base": corpus_result.hash_of("base.jsonl")}
    )
    key = stage_key("tokenizer", settings, inputs, ["student.tokenizer"])
    return StageSpec("tokenizer", key, build)


def converted_gguf(ctx: Context, gguf: Path, name: str) -> StageSpec:
    """A GGUF file dequantized into a Hugging Face Llama directory (``checkpoint`` in the info), once per file
    content: ``teacher_model`` (the local teacher) or ``student_init`` (``[model] init``)."""

    def build(out: Path, resume: bool) -> dict[str, Any]:
        from student.gguf_import import convert_gguf

        ctx.log(f"{name}: converting {gguf}")
        convert_gguf(gguf, out / "model")
        config = json.loads((out / "model" / "config.json").read_text(encoding="utf-8"))
        return {"checkpoint": "model", "source": str(gguf), "vocab_size": config["vocab_size"]}

    key = stage_key(name, {}, {"gguf": hash_file(gguf)}, ["student.gguf_import"])
    return StageSpec(name, key, build)


def teacher_model(ctx: Context) -> StageSpec:
    """The local teacher's GGUF file (the bundled SmolLM2 or a path) as a Hugging Face Llama directory."""
    gguf = local_teacher_gguf(ctx.config)
    if gguf is None:
        raise ValueError("teacher_model: the local teacher is not a GGUF file")
    return converted_gguf(ctx, gguf, "teacher_model")


def student_init_gguf(config: DistillConfig) -> Path | None:
    """``[model] init`` when it names a GGUF file (converted by the ``student_init`` stage), else None."""
    init = config.model.init
    return Path(init) if init is not None and init.endswith(".gguf") else None


def student_init(config: DistillConfig, init_result: StageResult | None) -> Path | None:
    """The Hugging Face directory students start from (``[model] init``), None for a fresh model."""
    if config.model.init is None:
        return None
    if init_result is not None:
        return Path(init_result.path) / init_result.info["checkpoint"]
    return Path(config.model.init)


# ---------------------------------------------------------------------------------------------- training helpers


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return path


def _torchrun(ctx: Context, nproc: int, module: str, spec_path: Path, what: str) -> None:
    """Launch ``module`` under torchrun; its output goes to the stage log, tqdm percentages to progress."""
    from pipeline.launch import launch, torchrun_command

    def log(line: str) -> None:
        ctx.log(f"[{what}] {line}")
        if match := PERCENT.search(line):
            ctx.report_progress(what, float(match.group(1)))

    ctx.log(f"{what}: torchrun --nproc-per-node={nproc} -m {module} {spec_path.name}")
    ctx.report_progress(what, 0.0)
    launch(torchrun_command(nproc, module, [str(spec_path)]), log=log, env=ctx.env)
    ctx.report_progress(what, 100.0)


def _final_checkpoint(out: Path) -> str:
    """``student.train`` leaves the model in ``out/final``; returned relative to ``out`` (it is renamed later)."""
    if not (out / "final").is_dir():
        raise RuntimeError(f"training finished but wrote no final checkpoint in {out}")
    return "final"


def _train_spec(
    model: Any,
    train: Any,
    loss: Any,
    tokenizer_path: Path,
    train_data: Path,
    val_data: Path,
    out_dir: Path,
    resume: bool,
) -> dict[str, Any]:
    """The SPEC.json of ``python -m student.train`` (keys agreed in docs/architecture.md)."""
    return {
        "model": model.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "loss": loss.model_dump(mode="json"),
        "tokenizer": str(tokenizer_path),
        "train_data": str(train_data),
        "val_data": str(val_data),
        "out_dir": str(out_dir),
        "resume": resume,
    }


# ---------------------------------------------------------------------------------------------- bootstrap teacher


def bootstrap_teacher(ctx: Context, corpus_result: StageResult, tok_result: StageResult) -> StageSpec:
    """The embedded default's teacher: trained here with hard CE on the standard-library text (TP as configured)."""
    settings = ctx.config.bootstrap

    def build(out: Path, resume: bool) -> dict[str, Any]:
        from pipeline.corpus import read_items
        from student.batches import TokenCorpus
        from student.settings import LossSettings
        from student.tokenizer import StudentTokenizer

        tok = StudentTokenizer.load(tok_result.file("tokenizer.json"))
        data = out / "data"
        paths = {}
        for split in ("train", "val"):
            texts = [
                i.prompt_text()
                for i in read_items(
                    corpus_result.file("base.jsonl"), [split] if split == "train" else ["val", "test"]
                )
            ]
            paths[split] = TokenCorpus.from_documents(tok.encode_batch(texts)).save(data / f"{split}.npz")
        spec = _train_spec(
            settings.model,
            settings.train,
            LossSettings(kind="hard"),
            tok_result.file("tokenizer.json"),
            paths["train"],
            paths["val"],
            out,
            resume,
        )
        spec_path = _write_json(out / "train_spec.json", spec)
        nproc = settings.train.tensor_parallel * settings.train.data_parallel
        _torchrun(ctx, nproc, TRAIN_MODULE, spec_path, "bootstrap_teacher")
        return {"checkpoint": _final_checkpoint(out), "train_log": "metrics.jsonl"}

    key = stage_key(
        "bootstrap_teacher",
        {"model": settings.model, "train": settings.train},
        {"base": corpus_result.hash_of("base.jsonl"), "tokenizer": tok_result.hash_of("tokenizer.json")},
        ["student"],
    )
    return StageSpec("bootstrap_teacher", key, build, resumable=True)


# ---------------------------------------------------------------------------------------------- collect


class CollectError(RuntimeError):
    """Collection failed as a whole (e.g. the teacher could not be reached); names the URL and the cause."""


def teacher_checkpoint(config: DistillConfig, teacher_result: StageResult | None) -> Path | None:
    """What the local teacher server serves (None for a remote teacher): the bootstrap teacher's or the converted
    GGUF's stage output, else the configured Hugging Face directory or project checkpoint."""
    if config.teacher.base_url != "local":
        return None
    if not uses_bootstrap_teacher(config) and local_teacher_gguf(config) is None:
        return Path(config.local_teacher.model)
    if teacher_result is None:
        raise ValueError("the teacher stage (bootstrap_teacher or teacher_model) must run before this one")
    return Path(teacher_result.path) / teacher_result.info["checkpoint"]


def teacher_identity(config: DistillConfig, teacher_result: StageResult | None) -> str:
    """The model name records are stored under. A local teacher's name carries a hash of its weights, so a
    retrained teacher never reuses the records of the previous one (its sample ids differ)."""
    checkpoint = teacher_checkpoint(config, teacher_result)
    if checkpoint is None:
        return config.teacher.model
    weights = teacher_result.hash_of() if teacher_result is not None else hash_value(hash_tree(checkpoint))
    return f"{config.teacher.model}-{weights[:10]}"


@contextlib.contextmanager
def _teacher_endpoint(
    ctx: Context, checkpoint: Path | None, model_name: str
) -> Iterator[tuple[str, str | None]]:
    """(base_url, api_key): the local server started for the duration of the block, or the configured API."""
    from teacher.secrets import install_redaction, resolve_api_key

    settings = ctx.config.teacher
    if checkpoint is None:
        api_key = resolve_api_key(settings, required=False)
        install_redaction(api_key)
        yield settings.base_url, api_key
        return
    from teacher.server import local_teacher_server

    ctx.log(f"collect: starting the local teacher server on {checkpoint}")
    with local_teacher_server(
        ctx.config.local_teacher, checkpoint=checkpoint, model_name=model_name
    ) as server:
        ctx.log(f"collect: local teacher at {server.base_url}")
        yield server.base_url, server.api_key or None


def failure_reasons(failures: list[Any]) -> dict[str, int]:
    """How many requests failed for each reason (most frequent first; each reason on one line)."""
    counts: dict[str, int] = {}
    for failure in failures:
        reason = " ".join(failure.reason.split())
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _check_failures(
    ctx: Context, base_url: str, requested: int, failed: int, reasons: dict[str, int]
) -> None:
    """Permanent failures up to ``teacher.max_failed_fraction`` of the requests are reported and tolerated (the
    run goes on with what was stored); more fail the stage, naming the URL and the most frequent causes."""
    if not failed:
        return
    settings = ctx.config.teacher
    causes = "; ".join(f"{count} x {reason}" for reason, count in list(reasons.items())[:3])
    summary = f"{failed} of {requested} request(s) to {base_url} failed after {settings.max_retries} retries"
    if failed > settings.max_failed_fraction * requested:
        raise CollectError(
            f"collect: {summary}, more than teacher.max_failed_fraction = {settings.max_failed_fraction:g}; "
            f"causes: {causes}"
        )
    ctx.log(f"collect: warning: {summary} (within teacher.max_failed_fraction); causes: {causes}")


def collect(
    ctx: Context,
    corpus_result: StageResult,
    teacher_result: StageResult | None,
    refresh: bool = False,
) -> StageSpec:
    """Ask the teacher about every sample not yet stored for this teacher and request parameters.

    Output: ``selection.json``, every sample id stored for this teacher and parameters, per split (what the
    snapshot will hold, so the snapshot's key changes exactly when its content does).

    Incremental by construction: the catalog knows which sample ids are stored, so a new key (more prompts, a
    code change) fetches only what is missing. ``refresh`` also re-asks for records older than
    ``teacher.max_age_days`` and is never cached (the refresh flow).
    """
    import time

    from teacher.client import request_params

    config = ctx.config
    name = teacher_identity(config, teacher_result)
    checkpoint = teacher_checkpoint(config, teacher_result)
    settings = config.teacher.model_copy(update={"model": name})
    if (
        checkpoint is not None and settings.tokenizer_path is None
    ):  # the local teacher's ids are its tokenizer's
        settings = settings.model_copy(update={"tokenizer_path": str(checkpoint / "tokenizer.json")})
    params = request_params(settings)

    def build(out: Path, resume: bool) -> dict[str, Any]:
        from pipeline.corpus import read_items
        from storage.catalog import Catalog
        from storage.records import SPLITS, sample_id
        from storage.shards import ShardWriter, shard_dir
        from teacher.collect import CollectResult
        from teacher.collect import collect as ask_teacher

        items = read_items(corpus_result.file("samples.jsonl"))
        resolve = None
        if settings.tokenizer_path is not None:  # teacher id -> bytes, for servers that report ids
            from student.tokenizer import StudentTokenizer

            resolve = StudentTokenizer.load(settings.tokenizer_path).token_bytes
        ids = [sample_id(item.prompt_text(), name, params) for item in items]
        wanted = set(ids)
        data_dir = config.storage.location()
        with Catalog.of(config.storage) as catalog:
            stored = catalog.existing_sample_ids(name, params)
            if refresh and config.teacher.max_age_days is not None:
                stale = catalog.stale_sample_ids(config.teacher.max_age_days * 86400.0)
                ctx.log(f"collect: {len(stale & stored)} stored record(s) are stale and asked again")
                stored -= stale
            todo = len(wanted - stored)
            ctx.log(f"collect: {len(items)} samples, {len(items) - todo} already stored, {todo} to ask")
            writer = ShardWriter(data_dir, config.storage, catalog)
            done = 0

            def sink(records, vocab) -> None:
                nonlocal done
                writer.add(records, vocab)
                done += len(records)
                ctx.report_progress("collect", 100.0 * done / max(todo, 1))

            if todo == 0:  # nothing new: no server to start, no request to make
                base_url, result = settings.base_url, CollectResult(skipped=len(items))
            else:
                with _teacher_endpoint(ctx, checkpoint, name) as (base_url, api_key):
                    if config.collect.workers > 1 or config.collect.dask_address:
                        result = _collect_partitions(ctx, items, settings, base_url, api_key, stored, catalog)
                    else:
                        result = ask_teacher(
                            items, settings, base_url, api_key, stored, sink, resolve=resolve
                        )
            writer.close()
            catalog.record_failures([(f.sample_id, f.reason) for f in result.failures])
            selection = {
                split: sorted(row[2] for row in catalog.select(splits=[split], teacher=name, params=params))
                for split in SPLITS
            }
            shards = sorted(
                {row[0] for row in catalog.select(teacher=name, params=params)}
            )  # (shard, row, id, ...)
        ctx.report_progress("collect", 100.0)
        reasons = failure_reasons(result.failures)
        _check_failures(ctx, base_url, result.requested, len(result.failures), reasons)
        _write_json(out / "selection.json", {"teacher": name, "params": params, "samples": selection})
        return {
            "teacher": name,
            "base_url": base_url,
            "requested": result.requested,
            "collected": result.collected,
            "skipped": result.skipped,
            "failed": len(result.failures),
            "failures": [{"sample_id": f.sample_id, "reason": f.reason} for f in result.failures[:20]],
            "failure_reasons": reasons,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "endpoints": {url: asdict(stats) for url, stats in result.endpoints.items()},
            "shards": [str(shard_dir(data_dir) / s) for s in shards],
            "collected_at": time.time(),
        }

    collect_settings = {
        k: v for k, v in config.teacher.model_dump(mode="json").items() if k not in TRANSPORT_FIELDS
    }
    inputs = {"samples": corpus_result.hash_of("samples.jsonl"), "teacher": name}
    if refresh:
        inputs["refresh"] = str(time.time())
    key = stage_key(
        "collect",
        {"teacher": collect_settings, "storage": str(config.storage.location().resolve())},
        inputs,
        ["teacher", "storage"],
    )
    return StageSpec("collect", key, build, external=lambda info: _local_files(info.get("shards", [])))


def _local_files(paths: list[str]) -> list[str]:
    """The files a cached result relies on that the cache can check: shards in object storage are left to
    ``create_snapshot``, which checks every shard it selects (the cache only looks at local files)."""
    from storage.filesystem import is_remote

    return [p for p in paths if not is_remote(p)]


def _collect_partitions(
    ctx: Context,
    items: list,
    settings: Any,
    base_url: str,
    api_key: str | None,
    stored: set[str],
    catalog: Any,
) -> Any:
    """``[collect] workers`` > 1: the pending items in partitions on Dask (``pipeline.collect_workers``)."""
    from pipeline.collect_workers import collect_partitioned

    def progress(done: int, total: int) -> None:
        ctx.report_progress("collect", 100.0 * done / total)

    return collect_partitioned(
        items, settings, base_url, api_key, stored, catalog, ctx.config.storage, ctx.config.collect,
        runner=ctx.partition_runner, log=ctx.log, progress=progress,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- snapshot


def snapshot(ctx: Context, collect_result: StageResult) -> StageSpec:
    """Immutable train/val/test snapshot manifests of the collected records (``storage.snapshot``)."""
    storage = ctx.config.storage
    selection_hash = collect_result.hash_of("selection.json")

    def build(out: Path, resume: bool) -> dict[str, Any]:
        from storage.catalog import Catalog
        from storage.snapshot import create_snapshot

        chosen = json.loads(collect_result.file("selection.json").read_text(encoding="utf-8"))
        info: dict[str, Any] = {}
        with Catalog.of(storage) as catalog:
            for split in ("train", "val", "test"):
                snap = create_snapshot(
                    catalog,
                    f"{split}-{selection_hash[:16]}",
                    splits=[split],
                    teacher=chosen["teacher"],
                    params=chosen["params"],
                )
                if snap.samples == 0 and split != "val":
                    raise CollectError(
                        f"snapshot: no {split} records for teacher {chosen['teacher']}; "
                        "check corpus.test_fraction / the splits in the prompt files"
                    )
                (out / f"{split}.json").write_bytes(snap.path.read_bytes())
                info[split] = {
                    "samples": snap.samples,
                    "tokens": snap.tokens,
                    "content_hash": snap.content_hash,
                }
                ctx.log(f"snapshot {split}: {snap.samples} samples, {snap.tokens} tokens")
        return info

    key = stage_key(
        "snapshot",
        {"data_dir": str(storage.location().resolve())},
        {"selection": selection_hash},
        ["storage"],
    )
    return StageSpec(
        "snapshot", key, build, external=lambda info: _local_files(collect_result.info.get("shards", []))
    )


# ---------------------------------------------------------------------------------------------- train


def train_stage_name(student: str, seed: int, seeds: list[int], lr: float | None = None) -> str:
    """``train_<student>`` for the first seed of ``[evaluate] seeds`` (so a one-seed run keeps its cache),
    ``train_<student>_s<seed>`` for the others; ``_lr<lr>`` appended for a run of the learning-rate sweep."""
    name = f"train_{student}" if seed == seeds[0] else f"train_{student}_s{seed}"
    return name if lr is None else f"{name}_lr{lr:g}"


def student_train_settings(config: DistillConfig, student: str, seed: int, lr: float | None = None) -> Any:
    """``[train]`` for one student and seed: peak ``lr`` from the sweep, else ``[students.<name>] lr``, else
    ``[train] lr``; ``min_lr`` keeps its ratio to the peak, so every learning rate gets the same schedule shape."""
    base = config.train
    peak = lr if lr is not None else config.students[student].lr or base.lr
    if peak == base.lr:
        return base.model_copy(update={"seed": seed})
    return base.model_copy(update={"seed": seed, "lr": peak, "min_lr": base.min_lr * peak / base.lr})


def train(
    ctx: Context,
    student: str,
    snapshot_result: StageResult,
    tok_result: StageResult,
    seed: int | None = None,
    init_result: StageResult | None = None,
    lr: float | None = None,
) -> StageSpec:
    """One student (``[students.<name>]``) trained with one seed (default: the first of ``[evaluate] seeds``):
    torchrun at TP x DP over the train snapshot, validated on val; from ``[model] init``'s weights when set
    (``init_result``: its conversion, for a GGUF file); ``lr``: a run of the learning-rate sweep."""
    config = ctx.config
    init = student_init(config, init_result)
    model = config.model.model_copy(update={"init": str(init) if init is not None else None})
    loss = config.students[student].loss()
    seeds = config.evaluate.seeds
    seed = seeds[0] if seed is None else seed
    name = train_stage_name(student, seed, seeds, lr)
    train_settings = student_train_settings(config, student, seed, lr)

    def build(out: Path, resume: bool) -> dict[str, Any]:
        val = snapshot_result.file("val.json")
        has_val = json.loads(val.read_text(encoding="utf-8"))["samples"] > 0
        spec = _train_spec(
            model,
            train_settings,
            loss,
            tok_result.file("tokenizer.json"),
            snapshot_result.file("train.json"),
            val if has_val else snapshot_result.file("test.json"),
            out,
            resume,
        )
        spec_path = _write_json(out / "train_spec.json", spec)
        nproc = config.train.tensor_parallel * config.train.data_parallel
        _torchrun(ctx, nproc, TRAIN_MODULE, spec_path, name)
        summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
        return {
            "checkpoint": _final_checkpoint(out),
            "train_log": "metrics.jsonl",
            "summary": summary,
            "student": student,
            "seed": seed,
            "lr": train_settings.lr,
        }

    inputs = {
        "train": snapshot_result.hash_of("train.json"),
        "val": snapshot_result.hash_of("val.json", "test.json"),
        "tokenizer": tok_result.hash_of("tokenizer.json"),
    }
    if init is not None:  # the weights themselves, not their path
        inputs["init"] = init_result.hash_of() if init_result is not None else hash_value(hash_tree(init))
    key = stage_key(
        name,
        {"model": config.model, "train": train_settings, "loss": loss},
        inputs,
        ["student", "storage"],
    )
    return StageSpec(name, key, build, resumable=True)


# ---------------------------------------------------------------------------------------------- evaluate, report


Trained = dict[str, list[tuple[int, StageResult]]]
"""Student name -> (seed, training stage result) per seed, in ``[evaluate] seeds`` order."""

Sweep = dict[str, list[tuple[float, StageResult]]]
"""Student name -> (peak learning rate, first-seed training result) per ``[sweep] lrs``; empty: no sweep."""


def _clusters(corpus_result: StageResult, collect_result: StageResult, out: Path) -> Path:
    """``clusters.json``: sample id -> source file (the corpus item's source id before '#'), the bootstrap's
    resampling unit; an item without a source id is its own cluster (left out)."""
    from pipeline.corpus import read_items
    from storage.records import sample_id

    chosen = json.loads(collect_result.file("selection.json").read_text(encoding="utf-8"))
    mapping = {
        sample_id(item.prompt_text(), chosen["teacher"], chosen["params"]): item.source_id.split("#")[0]
        for item in read_items(corpus_result.file("samples.jsonl"), ["test"])
        if item.source_id
    }
    return _write_json(out / "clusters.json", mapping)


def evaluate(
    ctx: Context,
    students: Trained,
    snapshot_result: StageResult,
    tok_result: StageResult,
    teacher_result: StageResult | None,
    corpus_result: StageResult,
    collect_result: StageResult,
    init_result: StageResult | None = None,
) -> StageSpec:
    """Held-out metrics of every student and seed (and the local teacher) on the test snapshot, with as many
    processes as training (``evaluation_tp``); documents clustered by source file."""
    config = ctx.config
    teacher_ckpt = teacher_checkpoint(config, teacher_result)

    def build(out: Path, resume: bool) -> dict[str, Any]:
        models = {
            f"{name}_s{seed}": {
                "checkpoint": str(r.file(r.info["checkpoint"])),
                "role": "student",
                "train_log": str(r.file(r.info["train_log"])),
                "group": name,
                "seed": seed,
            }
            for name, runs in students.items()
            for seed, r in runs
        }
        if teacher_ckpt is not None:
            train_log = teacher_result.info.get("train_log") if teacher_result is not None else None
            log = teacher_result.file(train_log) if train_log else None
            models["teacher"] = {
                "checkpoint": str(teacher_ckpt),
                "role": "teacher",
                "train_log": log and str(log),
            }
        spec = {
            **config.evaluate.model_dump(mode="json"),
            "data": str(snapshot_result.file("test.json")),
            "tokenizer": str(tok_result.file("tokenizer.json")),
            "models": models,
            "out": str(out / "metrics.json"),
            "tensor_parallel": evaluation_tp(config, teacher_ckpt, student_init(config, init_result)),
            "seed": config.run.seed,
            "clusters": str(_clusters(corpus_result, collect_result, out)),
        }
        spec_path = out / "evaluate_spec.json"  # not _write_json: its sorted keys would lose the report order
        spec_path.write_text(json.dumps(spec, indent=2, default=str), encoding="utf-8")
        _torchrun(ctx, config.train.tensor_parallel, EVALUATE_MODULE, spec_path, "evaluate")
        return {"metrics": "metrics.json"}

    inputs = {f"{name}_s{seed}": r.hash_of() for name, runs in students.items() for seed, r in runs}
    inputs |= {
        "test": snapshot_result.hash_of("test.json"),
        "tokenizer": tok_result.hash_of("tokenizer.json"),
        "samples": corpus_result.hash_of("samples.jsonl"),
        "selection": collect_result.hash_of("selection.json"),
    }
    if teacher_result is not None:
        inputs["teacher"] = teacher_result.hash_of()
    elif teacher_ckpt is not None:
        inputs["teacher"] = str(teacher_ckpt.resolve())
    key = stage_key(
        "evaluate",
        {"evaluate": config.evaluate, "tp": config.train.tensor_parallel, "seed": config.run.seed},
        inputs,
        ["student", "storage"],
    )
    return StageSpec("evaluate", key, build)


def _parallel_shape(checkpoint: Path) -> tuple[int, int]:
    """(key/value heads, ffn width) of a Hugging Face directory or a student.train checkpoint."""
    if (checkpoint / "config.json").is_file():
        hf = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        return int(hf.get("num_key_value_heads") or hf["num_attention_heads"]), int(hf["intermediate_size"])
    model = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))["model"]
    return int(model.get("num_query_groups") or model["num_attention_heads"]), int(model["ffn_hidden_size"])


def evaluation_tp(config: DistillConfig, teacher: Path | None, init: Path | None = None) -> int:
    """The largest tensor-parallel size up to the training one that every evaluated model can be split at
    (SmolLM2-135M's 3 key/value heads cannot be split in 2); the rest of the processes split the held-out
    documents (data parallel), so evaluation uses as many processes as training. ``init``: the students'
    starting checkpoint, whose architecture replaces ``[model]``'s."""
    model = config.model
    shapes = [_parallel_shape(init)] if init is not None else []
    shapes = shapes or [(model.num_query_groups or model.num_attention_heads, model.ffn_hidden_size)]
    if teacher is not None:
        shapes.append(_parallel_shape(teacher))
    tp = config.train.tensor_parallel
    return max(
        t for t in range(1, tp + 1) if tp % t == 0 and all(g % t == 0 and f % t == 0 for g, f in shapes)
    )


LOW_COVERAGE = 0.9
"""Below this share of teacher top-k entries mapping onto a student token, the report and the log warn: the
student's tokenizer cannot express much of what the teacher says (share the teacher's: tokenizer.source)."""


def _alignment(students: Trained, ctx: Context) -> dict[str, Any]:
    """Alignment of the teacher's top-k to the student vocabulary, as the first training run's reader saw it."""
    summary = next(iter(students.values()))[0][1].info.get("summary", {})
    alignment = summary.get("alignment")
    if not alignment:
        return {}
    coverage = alignment["coverage"]
    identity = ctx.config.tokenizer.source == "teacher"
    if coverage < LOW_COVERAGE:
        ctx.log(
            f"report: warning: only {coverage:.1%} of the teacher's top-k entries map onto a student token; "
            "the student learns from the rest of the targets only (tokenizer.source = 'teacher' shares its)"
        )
    return {
        "alignment_coverage": coverage,
        "alignment": "identity (the student shares the teacher's tokenizer)"
        if identity
        else "by token bytes",
    }


def _data_stats(collect_result: StageResult, snapshot_result: StageResult, storage: Any) -> dict[str, Any]:
    from storage.catalog import Catalog

    with Catalog.of(storage, sync=False) as catalog:
        bytes_per_token = catalog.stats().bytes_per_token
    info = collect_result.info
    return {
        "samples": {split: v["samples"] for split, v in snapshot_result.info.items()},
        "tokens": {split: v["tokens"] for split, v in snapshot_result.info.items()},
        "storage_bytes_per_token": bytes_per_token,
        "collection_failures": info.get("failed", 0),
        **({"collection_failure_reasons": info["failure_reasons"]} if info.get("failure_reasons") else {}),
        "cost_tokens": {
            "prompt": info.get("prompt_tokens", 0),
            "completion": info.get("completion_tokens", 0),
        },
        "teacher": info.get("teacher"),
    }


def _training(students: Trained, sweep: Sweep, config: DistillConfig) -> dict[str, Any]:
    """``training.json`` of the report: per student its peak learning rate, and per seed the final validation
    loss on its own objective and how much it still fell over the last quarter of training; the sweep's final
    validation loss per learning rate."""
    from pipeline.report import read_curves, tail_change

    def seed_row(seed: int, result: StageResult) -> dict[str, Any]:
        val = read_curves(result.file(result.info["train_log"]))["val"]
        return {"seed": seed, "val_loss": result.info["summary"].get("val_loss"), **tail_change(val, 0.25)}

    def peak_lr(name: str, seed: int, result: StageResult) -> float:  # results cached before "lr" was kept
        return result.info.get("lr") or student_train_settings(config, name, seed).lr

    return {
        "steps": config.train.steps,
        "students": {
            name: {"lr": peak_lr(name, *runs[0]), "seeds": [seed_row(seed, r) for seed, r in runs]}
            for name, runs in students.items()
        },
        "sweep": {
            name: [{"lr": lr, "val_loss": r.info["summary"].get("val_loss")} for lr, r in tried]
            for name, tried in sweep.items()
        },
    }


def report(
    ctx: Context,
    collect_result: StageResult,
    snapshot_result: StageResult,
    students: Trained,
    evaluate_result: StageResult,
    sweep: Sweep | None = None,
) -> StageSpec:
    """The report (HTML + Markdown + loss curves of each student's first seed, the training table with the
    learning-rate sweep, and a Markdown with the plot inline for Prefect)."""
    config = ctx.config
    sweep = sweep or {}

    def build(out: Path, resume: bool) -> dict[str, Any]:
        import shutil

        from pipeline.report import append_eval_results, artifact_markdown, build_report
        from storage.catalog import CATALOG_FILE

        shutil.copy2(evaluate_result.file("metrics.json"), out / "metrics.json")
        stats = _data_stats(collect_result, snapshot_result, config.storage)
        stats |= _alignment(students, ctx)
        curves = {name: runs[0][1].file(runs[0][1].info["train_log"]) for name, runs in students.items()}
        _write_json(out / "training.json", _training(students, sweep, config))
        paths = build_report(out, config, stats, curves, title=f"Distillation report: {config.run.name}")
        (out / "report_artifact.md").write_text(
            artifact_markdown(out, config, stats, curves, title=f"Distillation report: {config.run.name}"),
            encoding="utf-8",
        )
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        append_eval_results(config.storage.index_dir() / CATALOG_FILE, key, metrics)
        return {"html": paths.html.name, "markdown": paths.markdown.name}

    key = stage_key(
        "report",
        {"config": config},
        {
            "metrics": evaluate_result.hash_of("metrics.json"),
            "selection": collect_result.hash_of("selection.json"),
            **{
                f"{name}_s{seed}": r.hash_of("metrics.jsonl")
                for name, runs in students.items()
                for seed, r in runs
            },
            **{
                f"sweep_{name}_lr{lr:g}": r.hash_of("metrics.jsonl")
                for name, tried in sweep.items()
                for lr, r in tried
            },
        },
        ["pipeline.report"],
    )
    return StageSpec("report", key, build)
