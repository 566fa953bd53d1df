"""A tiny, self-contained pipeline project for tests: configs/tiny.toml with every folder under one root and
the corpus read from a JSONL prompt file (so tests can add prompts), written as a real TOML file."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CorpusSettings, parse_config, render_config
from pipeline.corpus import stdlib_items
from tests.support import ROOT

TINY = ROOT / "configs" / "tiny.toml"


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@dataclass
class TinyProject:
    root: Path
    prompts: Path

    def config(self, name: str = "tiny.toml", **sections: dict[str, Any]) -> Path:
        """Write configs/tiny.toml with this project's folders and prompt file, plus ``sections`` overrides."""
        data = tomllib.loads(TINY.read_text(encoding="utf-8"))
        data = _merge(
            data,
            {
                "run": {
                    "runs_dir": str(self.root / "runs"),
                    "work_dir": str(self.root / "work"),
                },
                "storage": {"data_dir": str(self.root / "data")},
                "corpus": {"source": "files", "paths": [str(self.prompts)]},
            },
        )
        data = _merge(data, sections)
        path = self.root / name
        path.write_text(render_config(parse_config(data, str(path)), commented=False), encoding="utf-8")
        return path

    def grown(self, texts: list[str], name: str = "grown") -> Path:
        """A config whose prompt source is this project's prompt file plus ``texts`` (a copy: the project's own
        prompt file stays as it is, so later tests still find every stage of ``config()`` cached)."""
        prompts = self.root / f"prompts-{name}.jsonl"
        lines = [json.dumps({"prompt": text, "split": "train"}) + "\n" for text in texts]
        prompts.write_text(self.prompts.read_text(encoding="utf-8") + "".join(lines), encoding="utf-8")
        return self.config(f"{name}.toml", corpus={"paths": [str(prompts)]})


def make_tiny_project(root: Path, n_prompts: int = 40) -> TinyProject:
    """Prompts are standard-library chunks with explicit splits (train / val / test)."""
    root.mkdir(parents=True, exist_ok=True)
    items = stdlib_items(CorpusSettings(max_files=40, chunk_chars=240, max_samples=n_prompts), seed=11)
    prompts = root / "prompts.jsonl"
    splits = ["train", "train", "train", "val", "test"]
    with prompts.open("w", encoding="utf-8") as f:
        for i, item in enumerate(items):
            f.write(json.dumps({"prompt": item.prompt, "split": splits[i % len(splits)]}) + "\n")
    return TinyProject(root, prompts)
