"""The one config model a user edits as one TOML file.

Each section is defined next to the code that owns it (``storage/settings.py``, ``teacher/settings.py``,
``student/settings.py``); this module composes them, loads TOML with clear errors, and renders the
commented default file that ``distill config init`` writes.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.settings import StorageSettings
from student.settings import LossSettings, ModelSettings, TrainSettings
from teacher.settings import LocalTeacherSettings, TeacherSettings


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(_Section):
    name: str = Field("default", description="Name of this pipeline (used in run ids and reports).")
    runs_dir: Path = Field(
        Path("runs"), description="Where each run writes runs/<run-id>/ (summary.json, report)."
    )
    work_dir: Path = Field(
        Path("work"), description="Where stage outputs are cached, keyed by their input hash."
    )
    seed: int = Field(1234, description="Global seed of the corpus split and everything downstream.")


class CorpusSettings(_Section):
    source: Literal["stdlib", "files"] = Field(
        "stdlib", description="stdlib: the Python standard library's own source; files: the paths below."
    )
    paths: list[Path] = Field(
        default_factory=list,
        description="Input files (JSONL prompts, plain text, Parquet) when source = 'files'.",
    )
    max_files: int = Field(
        400, gt=0, description="Standard-library source files used (sorted, deterministic)."
    )
    chunk_chars: int = Field(1200, gt=0, description="Characters per text chunk (one sample) for score mode.")
    max_samples: int = Field(2000, gt=0, description="Maximum samples taken from the corpus.")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of samples held out for validation during training."
    )
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of samples held out for evaluation (never trained on)."
    )
    prompt_chars: int = Field(
        200, gt=0, description="Characters of each chunk used as the prompt in generate mode."
    )


class TokenizerSettings(_Section):
    source: Literal["train", "teacher"] = Field(
        "train",
        description="train: a byte-level BPE trained on the corpus (or the file in path); teacher: the local "
        "teacher's own tokenizer (alignment is then the identity).",
    )
    path: Path | None = Field(
        None,
        description="A tokenizer.json to use (source = 'train'); None trains a byte-level BPE on the corpus.",
    )
    vocab_size: int = Field(2048, ge=260, description="Vocabulary size of the trained byte-level BPE.")


class BootstrapSettings(_Section):
    """The test suite's teacher (local_teacher.model = 'bootstrap'): a small model trained here on the corpus."""

    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(
            num_layers=4, hidden_size=256, num_attention_heads=8, ffn_hidden_size=688
        ),
        description="Architecture of the bootstrap teacher.",
    )
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(tensor_parallel=1, steps=600, lr=2e-3, micro_batch_size=16),
        description="Training of the bootstrap teacher (hard CE on the corpus).",
    )


class EvaluateSettings(_Section):
    max_batches: int = Field(
        64, gt=0, description="Held-out documents evaluated: at most max_batches x micro_batch_size."
    )
    bootstrap_samples: int = Field(
        1000,
        gt=0,
        description="Bootstrap resamples (source files x training seeds) for confidence intervals.",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    ece_bins: int = Field(15, gt=0, description="Bins of the expected calibration error.")
    generation_prompts: int = Field(
        4, ge=0, description="Held-out prompts generated from, side by side with the teacher."
    )
    generation_tokens: int = Field(48, gt=0, description="Tokens generated per sample.")
    prompt_tokens: int = Field(
        32, gt=0, description="Held-out tokens given as the prompt of each generation sample."
    )
    micro_batch_size: int = Field(
        8, gt=0, description="Held-out rows (documents or windows) per forward pass."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [1234],
        min_length=1,
        description="Training seeds: each student is trained once per seed; intervals cover seeds and files.",
    )
    window_stride: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Stride of the held-out sliding windows over documents longer than a model's context, "
        "as a fraction of the context (every label keeps at least context x (1 - stride) tokens before it).",
    )
    mass_buckets: list[float] = Field(
        default_factory=lambda: [0.5, 0.8, 0.95],
        description="Edges of the teacher top-k mass W buckets of the held-out breakdown.",
    )


class StudentSettings(LossSettings):
    """A ``[students.<name>]`` section: the student's loss (``student.settings.LossSettings``) and its own peak
    learning rate."""

    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of this student (default: [train] lr; min_lr scales with it); "
        "ignored when [sweep] lrs is set.",
    )

    def loss(self) -> LossSettings:
        """The loss alone, as ``student.train`` takes it."""
        return LossSettings.model_validate(self.model_dump(exclude={"lr"}))


class SweepSettings(_Section):
    lrs: list[float] = Field(
        default_factory=list,
        description="Peak learning rates tried for every student (first seed, full schedule; min_lr scales "
        "with each); the lowest final validation loss on the student's own objective wins. Empty: no sweep.",
    )

    @field_validator("lrs")
    @classmethod
    def _positive_and_distinct(cls, lrs: list[float]) -> list[float]:
        if any(lr <= 0 for lr in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"expected distinct positive learning rates, got {lrs}")
        return lrs


class CollectSettings(_Section):
    workers: int = Field(
        1, ge=1, description="Collection workers (Dask worker processes); 1 collects in the calling process."
    )
    dask_address: str = Field(
        "", description="Dask scheduler to run partitions on (tcp://host:8786); empty: a local cluster."
    )
    partitions: int = Field(
        0, ge=0, description="Partitions the pending prompts are split into (0: two per worker)."
    )


class DistillConfig(_Section):
    run: RunSettings = Field(default_factory=RunSettings, description="Run naming and output folders.")
    corpus: CorpusSettings = Field(
        default_factory=CorpusSettings, description="Where prompts / text come from."
    )
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings, description="Student tokenizer.")
    teacher: TeacherSettings = Field(
        default_factory=TeacherSettings, description="The teacher API and how it is asked."
    )
    local_teacher: LocalTeacherSettings = Field(
        default_factory=LocalTeacherSettings, description="The local teacher server."
    )
    bootstrap: BootstrapSettings = Field(
        default_factory=BootstrapSettings, description="Embedded default's teacher."
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="Parquet shards and the DuckDB catalog."
    )
    collect: CollectSettings = Field(
        default_factory=CollectSettings, description="Collection spread over workers (Dask)."
    )
    model: ModelSettings = Field(default_factory=ModelSettings, description="Student architecture.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Student training.")
    students: dict[str, StudentSettings] = Field(
        default_factory=lambda: {"soft": StudentSettings(kind="soft"), "hard": StudentSettings(kind="hard")},
        description="Students trained side by side, each with its loss (soft vs hard is the comparison).",
    )
    sweep: SweepSettings = Field(
        default_factory=SweepSettings, description="Learning-rate sweep on the validation split."
    )
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings, description="Held-out evaluation.")

    @model_validator(mode="after")
    def _local_index_of_remote_data(self) -> DistillConfig:
        """With shards in object storage the catalog index lives in the work dir unless placed elsewhere."""
        if self.storage.catalog_dir is None and not isinstance(self.storage.location(), Path):
            self.storage.catalog_dir = Path(self.run.work_dir) / "catalog"
        return self


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(root)"


def _describe(error: dict[str, Any]) -> str:
    key = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    got = error.get("input")
    return f"key '{key}': {error['msg']} (got {got!r})"


def parse_config(data: dict[str, Any], source: str = "<config>") -> DistillConfig:
    """Validate a parsed TOML document; errors name the source, each bad key and what was expected."""
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(e)}" for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> DistillConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return parse_config(data, str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return _toml_value(str(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def _render_section(name: str, model: BaseModel, out: list[str]) -> None:
    scalars, tables = [], []
    for field_name, info in type(model).model_fields.items():
        value = getattr(model, field_name)
        if isinstance(value, BaseModel):
            tables.append((f"{name}.{field_name}", value))
        elif isinstance(value, dict):
            tables.extend((f"{name}.{field_name}.{k}", v) for k, v in value.items())
        else:
            scalars.append((field_name, info, value))
    out.append(f"[{name}]")
    for field_name, info, value in scalars:
        out.append(f"# {info.description}")
        out.append(f"# {field_name} = (unset)" if value is None else f"{field_name} = {_toml_value(value)}")
    out.append("")
    for sub_name, sub in tables:
        _render_section(sub_name, sub, out)


def render_config(config: DistillConfig, commented: bool = True) -> str:
    """The config as TOML; with ``commented`` each key carries its one-line description."""
    out: list[str] = ["# distill config: every key is optional; the value shown is the default.", ""]
    for field_name, info in DistillConfig.model_fields.items():
        value = getattr(config, field_name)
        out.append(f"# --- {info.description}")
        if isinstance(value, dict):
            for k, v in value.items():
                _render_section(f"{field_name}.{k}", v, out)
        else:
            _render_section(field_name, value, out)
    text = "\n".join(out)
    if not commented:
        text = "\n".join(
            line for line in text.splitlines() if not line.startswith("# ") or line.startswith("# ---")
        )
    return text + "\n"
