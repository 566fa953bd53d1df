"""``distill collect CONFIG`` (ask the teacher, store top-k shards) and ``distill import FORMAT FILE``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from pipeline.cli import UserError
from pipeline.config import DistillConfig, load_config
from storage.catalog import Catalog, record_shape
from storage.records import TeacherVocab, TopKRecord
from storage.shards import ShardWriter
from teacher.check import TeacherUnreachable, reachable
from teacher.client import request_params
from teacher.collect import collect
from teacher.importers import FORMATS, import_metaseq, import_openai_batch
from teacher.inputs import InputError, ReadStats, read_inputs
from teacher.parsing import Resolve
from teacher.secrets import SecretError, install_redaction, resolve_api_key

log = logging.getLogger("distill.collect")


def _is_local(base_url: str | list[str]) -> bool:
    urls = [base_url] if isinstance(base_url, str) else base_url
    return all(urlparse(url).hostname in ("127.0.0.1", "localhost", "::1") for url in urls)


def _resolver(config: DistillConfig) -> Resolve | None:
    path = config.teacher.tokenizer_path or config.tokenizer.path
    if path is None:
        return None
    from student.tokenizer import StudentTokenizer

    return StudentTokenizer.load(path).token_bytes


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of worker processes, got {text!r}")
    return int(text)


def _collect(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = config.teacher
    base_url = args.base_url or settings.base_url
    if base_url == "local":
        raise UserError(
            "teacher.base_url = 'local': start the local teacher (python -m teacher.server ...) and pass its URL "
            "with --base-url, or run the whole pipeline with `distill run`"
        )
    paths = [Path(p) for p in args.input] or list(config.corpus.paths)
    if not paths:
        raise UserError("no inputs: give --input FILE or corpus.paths in the config")
    try:
        api_key = resolve_api_key(settings, required=not _is_local(base_url))
    except SecretError as exc:
        raise UserError(str(exc)) from None
    install_redaction(api_key)
    if api_key is None:
        log.warning("no API key (%s is unset): asking %s without one", settings.api_key_env, base_url)
    stats = ReadStats()
    try:
        items = list(read_inputs(paths, config.corpus.chunk_chars, settings.on_bad_line, stats))
        if args.limit:
            items = items[: args.limit]
    except InputError as exc:
        raise UserError(str(exc)) from None
    unreachable = []  # one cheap request before fanning out: an unreachable teacher fails in seconds
    for url in [base_url] if isinstance(base_url, str) else base_url:
        try:
            reachable(url, api_key)
        except TeacherUnreachable as exc:
            unreachable.append(str(exc))
    if unreachable and len(unreachable) == (1 if isinstance(base_url, str) else len(base_url)):
        raise UserError("; ".join(unreachable))
    for problem in unreachable:  # others answer: the collector sets the silent ones aside
        log.warning("%s", problem)
    options = config.collect.model_copy(
        update={k: v for k, v in (("workers", args.workers), ("dask_address", args.dask_address)) if v}
    )
    with Catalog.of(config.storage) as catalog:
        stored = catalog.existing_sample_ids(settings.model, request_params(settings))
        if options.workers > 1 or options.dask_address:  # partitions on Dask, shards registered here
            from pipeline.collect_workers import PartitionError, collect_partitioned

            if settings.tokenizer_path is None and config.tokenizer.path is not None:  # as _resolver: workers
                settings = settings.model_copy(update={"tokenizer_path": str(config.tokenizer.path)})
            try:
                result = collect_partitioned(
                    items, settings, base_url, api_key, stored, catalog, config.storage, options,
                    log=lambda line: log.info("%s", line),
                )  # fmt: skip
            except PartitionError as exc:
                raise UserError(str(exc)) from None
        else:
            with ShardWriter(config.storage.location(), config.storage, catalog) as writer:
                try:
                    result = collect(
                        items, settings, base_url, api_key, stored, writer, resolve=_resolver(config),
                        progress=not args.no_progress,
                    )  # fmt: skip
                except ValueError as exc:
                    raise UserError(str(exc)) from None
        catalog.record_failures([(f.sample_id, f.reason) for f in result.failures])
    print(
        f"collected {result.collected}, already stored {result.skipped}, failed {len(result.failures)}, "
        f"skipped input lines {len(stats.skipped_lines)}; usage: {result.prompt_tokens} prompt + "
        f"{result.completion_tokens} completion tokens in {result.seconds:.1f}s"
    )
    print(result.fragments.render())
    if len(result.endpoints) > 1:
        for url, counts in result.endpoints.items():
            print(
                f"endpoint {url}: {counts.requests} requests, {counts.tokens} tokens, {counts.failures} failed, "
                f"set aside {counts.set_aside} time(s)"
            )
    for failure in result.failures:
        print(f"failed {failure.sample_id}: {failure.reason}")
    return 1 if result.failures else 0


def _import_source(args: argparse.Namespace, path: Path, vocab: TeacherVocab) -> Iterator[TopKRecord | tuple]:
    if args.format == "metaseq":
        return import_metaseq(path, vocab, teacher=args.teacher, split=args.split)
    requests = Path(args.requests) if args.requests else None
    return import_openai_batch(path, vocab, requests, split=args.split)


def _import(args: argparse.Namespace) -> int:
    storage = load_config(args.config).storage if args.config else None
    data_dir = storage.data_dir if storage is not None else Path(args.data_dir)
    paths = [Path(p) for p in args.files]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: file not found")
    try:  # a first pass validates every line, so a bad file leaves no shard behind
        for path in paths:
            for _ in _import_source(args, path, TeacherVocab()):
                pass
    except InputError as exc:
        raise UserError(str(exc)) from None
    vocab = TeacherVocab()
    failures: list[tuple[str, str]] = []
    count = already = completion_only = 0
    with Catalog(data_dir) as catalog:
        stored = catalog.stored_shapes()
        with ShardWriter(data_dir, storage, catalog) as writer:
            for path in paths:
                for item in _import_source(args, path, vocab):
                    if not isinstance(item, TopKRecord):
                        failures.append(item)
                    elif stored.get(item.sample_id) == record_shape(item):
                        already += 1  # imported before: the same sample with the same content
                    else:
                        writer([item], vocab)
                        stored[item.sample_id] = record_shape(item)
                        count += 1
                        completion_only += item.params.get("prompt") == "unknown"
        catalog.record_failures(failures)
    print(
        f"imported {count} records into {data_dir} ({already} already stored); "
        f"{len(failures)} failed requests recorded"
    )
    if completion_only:
        print(
            f"{completion_only} records stored completion-only: without --requests their prompts are unknown "
            "(not invented); give the batch's input file to store them"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "collect", help="Ask the teacher for top-k logprobs of every input not yet stored."
    )
    parser.add_argument("config", help="Config file.")
    parser.add_argument("--base-url", help="Teacher base URL (overrides teacher.base_url).")
    parser.add_argument(
        "--input", action="append", default=[], help="Input file (repeatable; default corpus.paths)."
    )
    parser.add_argument("--limit", type=int, default=0, help="Only the first N inputs.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "--workers", type=_positive, default=0, help="Dask worker processes (overrides [collect] workers)."
    )
    parser.add_argument(
        "--dask-address", default="", help="Dask scheduler (overrides [collect] dask_address)."
    )
    parser.set_defaults(handler=_collect)

    imp = sub.add_parser("import", help="Import existing teacher data (OpenAI Batch output, metaseq JSONL).")
    imp.add_argument("format", choices=FORMATS)
    imp.add_argument("files", nargs="+", help="Files to import.")
    where = imp.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="Config file (its storage.data_dir receives the shards).")
    where.add_argument("--data-dir", help="Data folder receiving the shards.")
    imp.add_argument("--requests", help="openai-batch: the batch's input file (gives the prompts).")
    imp.add_argument("--teacher", default="metaseq-teacher", help="metaseq: the teacher's name.")
    imp.add_argument("--split", default="train", choices=("train", "val", "test"))
    imp.set_defaults(handler=_import)
