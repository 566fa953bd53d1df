"""Content-addressed stage outputs: cache keys, the stage runner, and the per-run summary.

A stage's cache key is a hash of (stage name, the config sections it reads, the content hashes of the artifacts
it consumes, and the code version of the packages it runs). Its output lives in ``work_dir/<stage>/<key>/`` and
is written atomically: the stage fills a temporary sibling directory, a manifest (``_stage.json``) is written
last, then the directory is renamed into place. A directory with a manifest whose external files still exist is
*complete* and is reused; anything else is rebuilt.

Downstream keys hash the *content* of the files an upstream stage produced (recorded in its manifest), not the
upstream key, so a stage that re-runs and produces the same bytes (e.g. a corpus rebuilt after a code edit that
changed nothing) does not invalidate everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

MANIFEST = "_stage.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def hash_value(value: Any) -> str:
    """Stable sha256 of a JSON-able value (pydantic models and paths included), key order independent."""
    text = json.dumps(_jsonable(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """Content hash of every regular file under ``root`` (relative posix path -> sha256), manifest excluded."""
    return {
        p.relative_to(root).as_posix(): hash_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _module_files(name: str) -> list[Path]:
    spec = importlib_util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"code version: no module named {name!r}")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        return sorted(p for p in origin.parent.rglob("*.py") if "__pycache__" not in p.parts)
    return [origin]


def code_version(*modules: str) -> str:
    """Hash of the source files of the given modules/packages (a package means all its ``.py`` files).

    Not memoised: a long-lived process (a notebook, a test session) must see code edited since it started."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        for path in _module_files(name):
            digest.update(f"{name}:{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    """What a finished stage hands downstream (picklable: Prefect persists it as the cached task result)."""

    stage: str
    key: str
    path: str
    hashes: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    status: Literal["ran", "cached"] = "ran"
    seconds: float = 0.0

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def hash_of(self, *names: str) -> str:
        """Content hash of some of this stage's files (all of them when no name is given)."""
        chosen = names or tuple(sorted(self.hashes))
        missing = [n for n in chosen if n not in self.hashes]
        if missing:
            raise KeyError(f"stage {self.stage} produced no file {missing[0]!r} (has {sorted(self.hashes)})")
        return hash_value({n: self.hashes[n] for n in chosen})


Builder = Callable[[Path, bool], dict[str, Any] | None]


@dataclass
class StageSpec:
    """One stage, ready to run: its name, cache key, and the function that fills its output directory.

    ``build(out_dir, resume)`` writes files into ``out_dir`` and may return JSON-able info (counts, metrics) kept
    in the manifest. A ``resumable`` stage (training) builds in ``.partial-<key>``, kept when the build fails or
    is killed, and the next build is called with ``resume=True`` to continue from its checkpoints; other stages
    build in a fresh temporary directory removed on failure. ``external(info)`` lists files outside the output directory the result relies on (e.g. the
    Parquet shards a collection wrote); if any of them disappears, the stage is no longer complete.
    """

    name: str
    key: str
    build: Builder
    external: Callable[[dict[str, Any]], Iterable[str]] = lambda info: ()
    resumable: bool = False

    def out_dir(self, work_dir: Path) -> Path:
        return Path(work_dir) / self.name / self.key


def stage_key(name: str, settings: Any, inputs: dict[str, str], code: Iterable[str]) -> str:
    """The cache key: stage name + config section(s) + input artifact hashes + code version."""
    return hash_value(
        {"stage": name, "settings": settings, "inputs": inputs, "code": code_version(*sorted(code))}
    )[:24]


def read_complete(spec: StageSpec, work_dir: Path) -> StageResult | None:
    """The stored result of this spec if its output is complete (manifest present, external files present)."""
    out = spec.out_dir(work_dir)
    manifest = out / MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text(encoding="utf-8"))
    if data.get("key") != spec.key:
        return None
    if any(not Path(p).exists() for p in spec.external(data.get("info", {}))):
        return None
    if any(not (out / name).is_file() for name in data["hashes"]):
        return None
    return StageResult(stage=spec.name, key=spec.key, path=str(out), hashes=data["hashes"], info=data["info"])


def run_stage(spec: StageSpec, work_dir: Path) -> StageResult:
    """Reuse a complete output with the same key, or build it atomically (tmp dir, manifest, rename)."""
    started = time.perf_counter()
    found = read_complete(spec, work_dir)
    if found is not None:
        return StageResult(**{**asdict(found), "status": "cached", "seconds": time.perf_counter() - started})
    out = spec.out_dir(work_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.resumable:
        tmp = out.parent / f".partial-{spec.key}"
        resume = tmp.is_dir() and any(tmp.iterdir())
        tmp.mkdir(exist_ok=True)
    else:
        tmp, resume = out.parent / f".tmp-{spec.key}-{uuid.uuid4().hex[:8]}", False
        tmp.mkdir()
    try:
        info = _jsonable(spec.build(tmp, resume) or {})
        hashes = hash_tree(tmp)
        manifest = {"stage": spec.name, "key": spec.key, "hashes": hashes, "info": info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        if out.exists():  # an incomplete or stale output under the same key
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        if not spec.resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageResult(
        stage=spec.name,
        key=spec.key,
        path=str(out),
        hashes=hashes,
        info=info,
        status="ran",
        seconds=time.perf_counter() - started,
    )


def new_run_id(name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{name}-{uuid.uuid4().hex[:6]}"


def write_summary(run_dir: Path, run_id: str, results: list[StageResult], extra: dict[str, Any]) -> Path:
    """``runs/<run-id>/summary.json``: per stage its status (ran|cached), seconds and output path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "run_id": run_id,
        **extra,
        "stages": {
            r.stage: {"status": r.status, "seconds": round(r.seconds, 3), "path": r.path, "key": r.key}
            for r in results
        },
        "total_seconds": round(sum(r.seconds for r in results), 3),
    }
    path = run_dir / "summary.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path
