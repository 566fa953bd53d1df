"""The per-run report (self-contained HTML + Markdown), the run comparison, and eval rows in the DuckDB catalog.

Called by the pipeline's ``report`` stage and the ``distill report`` CLI; knows nothing about Prefect.

Public API:

- ``build_report(run_dir, config=None, data_stats=None, curves=None, title=None) -> ReportPaths``: writes
  ``run_dir/report.html`` (images as data URIs, no external resource) and ``run_dir/report.md`` (+
  ``run_dir/curves.png`` it links to). Inputs not passed are read from the run directory:
  ``metrics.json`` (required; written by ``student.evaluate``, schema in its docstring), ``config.toml``,
  ``data_stats.json`` (shape: ``DataStats``), ``training.json`` (learning rates, the sweep, how far validation
  loss still fell: ``pipeline.stages``' report stage writes it) and, per model, the training log named by ``train_log`` in
  ``metrics.json`` (``student.train``'s ``metrics.jsonl``). ``curves`` maps a model name to its log path.
- ``artifact_markdown(run_dir, ...same inputs) -> str``: the Markdown report with the plot embedded as a data
  URI, for a Prefect markdown artifact.
- ``compare_runs(run_a, run_b) -> str``: Markdown comparing two runs' ``metrics.json`` (``distill report
  compare``).
- ``append_eval_results(catalog, run_id, metrics)``: appends one row per (model, metric) to the table
  ``eval_results`` of a DuckDB database (a path, or the open connection of ``storage.catalog.Catalog``), so
  runs compare over time with SQL::

      SELECT run_id, model, value, ci_low, ci_high FROM eval_results WHERE metric = 'kl_teacher_student'

What the report prints (for the README's soft-vs-hard statement): a **Result** list: the held-out set (documents,
source files, no context cuts), how the intervals are made (source files x training seeds, ``student.metrics``),
the teacher's top-k mass W and in-top-k rate, which full-vocabulary metrics could not be given and why, then for
hard CE, KL(teacher‖student) over the full vocabulary and the KL over top-k + tail bins, each paired difference
of students with its interval, worded by one rule (``_verdict``): "X is better" only when the interval excludes
0 and more than one seed was trained, otherwise "no difference shown"; then the teacher's self-check. Then the
full metric table (mean over seeds [interval] sd across seeds), the breakdown by buckets of W, curves, data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from pipeline.config import DistillConfig, render_config
from student.specs import read_json

SCHEMA = "distill-eval/2"
METRIC_LABELS = {
    "ce": ("hard CE, nats/token", "lower"),
    "perplexity": ("perplexity", "lower"),
    "soft_ce": ("soft CE over top-k + tail bins", "lower"),
    "kl_teacher_student": ("KL over top-k + tail bins (the soft loss itself)", "lower"),
    "full_kl_teacher_student": ("KL(teacher‖student), full vocabulary", "lower"),
    "ce_outside_teacher_topk": ("hard CE where the token is outside the teacher's top-k", "lower"),
    "top1_agreement": ("top-1 agreement with teacher", "higher"),
    "ece": ("ECE of student top-1", "lower"),
}
HEADLINE = ("ce", "full_kl_teacher_student", "kl_teacher_student")
SECRET_KEY = re.compile(r"(^|_)(api_key|password|secret)$")


class DataStats(TypedDict, total=False):
    """What the pipeline knows about the data, passed to the report (every key optional).

    ``samples`` / ``tokens``: per split (``train``, ``val``, ``test``), teacher tokens stored;
    ``storage_bytes_per_token``: Parquet bytes on disk per stored position; ``alignment_coverage``: share of
    teacher top-k entries that mapped onto a student id (0..1), ``alignment``: how (identity or by bytes);
    ``collection_failures``: requests that failed after every retry, ``collection_failure_reasons``: how many
    for each reason; ``cost_tokens``: usage the teacher API reported, ``{"prompt": n, "completion": n}``. Other
    keys are shown as given.
    """

    samples: dict[str, int]
    tokens: dict[str, int]
    storage_bytes_per_token: float
    alignment_coverage: float
    alignment: str
    collection_failures: int
    collection_failure_reasons: dict[str, int]
    cost_tokens: dict[str, int]


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    markdown: Path
    plot: Path | None


class ReportError(ValueError):
    """A run directory or metrics file the report cannot use; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------- inputs


def load_metrics(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    data = read_json(path, "metrics file not found (run the evaluate stage first)", ReportError)
    if data.get("schema") != SCHEMA:
        raise ReportError(f"{path}: expected schema {SCHEMA!r}, got {data.get('schema')!r}")
    for name in data.get("models", []):
        if name not in data:
            raise ReportError(f"{path}: model {name!r} is listed under 'models' but has no entry")
    return data


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "val": [...], "val_hard_ce": [...]}`` from a training ``metrics.jsonl``.

    Each line is one JSON object of ``student.train``'s log: ``step``, ``split`` (train | val), ``loss`` (the
    student's own objective: soft CE for a soft student) and ``hard_ce``; other keys are ignored. The
    validation hard CE is the curve that compares across students.
    """
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "val": [], "val_hard_ce": []}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{number}: not valid JSON: {exc}") from None
        split, step = row.get("split"), row.get("step")
        if split not in ("train", "val") or step is None:
            continue
        if row.get("loss") is not None:
            curves[split].append((int(step), float(row["loss"])))
        if split == "val" and row.get("hard_ce") is not None:
            curves["val_hard_ce"].append((int(step), float(row["hard_ce"])))
    return curves


FLAT_TAIL = 0.02
"""Validation loss counts as flattened when it fell by less than this fraction over the last quarter."""


def tail_change(curve: list[tuple[int, float]], fraction: float) -> dict[str, Any]:
    """How much a validation curve still moved over its last ``fraction`` of steps: ``tail_from_step`` (the
    first evaluation at or after that point) and ``tail_change``, relative to the loss there (negative: still
    falling); both None with fewer than two evaluations in the span."""
    points = sorted(curve)
    if len(points) < 2:
        return {"tail_from_step": None, "tail_change": None}
    start = next(p for p in points if p[0] >= points[-1][0] * (1 - fraction))
    if start == points[-1]:
        start = points[-2]
    return {"tail_from_step": start[0], "tail_change": (points[-1][1] - start[1]) / start[1]}


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.1%}"


def training_table(training: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per student and seed: peak learning rate, final validation loss on the student's own objective,
    and its change over the last quarter of training."""
    steps = training.get("steps", "?")
    header = [
        "student",
        "seed",
        "peak lr",
        "final val loss (own objective)",
        f"val change, last quarter of {steps}",
    ]
    rows = [
        [name, str(run["seed"]), f"{block['lr']:g}", _fmt(run["val_loss"]), _percent(run["tail_change"])]
        for name, block in training.get("students", {}).items()
        for run in block["seeds"]
    ]
    return header, rows


def sweep_table(training: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Final validation loss (own objective, first seed) per student and swept learning rate; * the one kept."""
    sweep = training.get("sweep") or {}
    lrs = sorted({entry["lr"] for tried in sweep.values() for entry in tried})
    header = ["student", *(f"lr {lr:g}" for lr in lrs)]
    rows = []
    for name, tried in sweep.items():
        by_lr = {entry["lr"]: entry["val_loss"] for entry in tried}
        chosen = training["students"][name]["lr"]
        rows.append([name, *(_fmt(by_lr.get(lr)) + (" *" if lr == chosen else "") for lr in lrs)])
    return header, rows


def training_lines(training: Mapping[str, Any] | None) -> list[str]:
    """Whether training ran long enough (validation loss flattened) and how the learning rates were chosen."""
    if not training or not training.get("students"):
        return []
    still = sorted(
        {
            name
            for name, block in training["students"].items()
            for run in block["seeds"]
            if run["tail_change"] is not None and run["tail_change"] < -FLAT_TAIL
        }
    )
    flat = (
        f"Validation loss flattened for every student (fell less than {FLAT_TAIL:.0%} over the last quarter of "
        "training)."
        if not still
        else f"Validation loss still falling (more than {FLAT_TAIL:.0%} over the last quarter of training) for "
        f"{', '.join(still)}: longer training may change the comparison."
    )
    if training.get("sweep"):
        how = (
            "Learning rates: each student's best of the sweep by final validation loss on its own objective."
        )
    else:
        how = "Learning rates: as configured (no sweep in this run)."
    return [flat, how]


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ("<redacted>" if SECRET_KEY.search(str(k)) and v is not None else _redacted(v))
            for k, v in value.items()
        }
    return value


def _config_text(config: DistillConfig | None) -> str | None:
    if config is None:
        return None
    safe = DistillConfig.model_validate(_redacted(config.model_dump()))
    return render_config(safe, commented=False)


def _load_training(run_dir: Path) -> dict[str, Any] | None:
    """``training.json`` (the pipeline's report stage writes it; absent for a bare ``distill report``)."""
    path = run_dir / "training.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def _load_inputs(
    run_dir: Path,
    config: DistillConfig | None,
    data_stats: Mapping[str, Any] | None,
    curves: Mapping[str, Path] | None,
) -> tuple[dict[str, Any], DistillConfig | None, Mapping[str, Any] | None, dict[str, Path]]:
    metrics = load_metrics(run_dir / "metrics.json")
    if config is None and (run_dir / "config.toml").is_file():
        config = DistillConfig.model_validate(tomllib.loads((run_dir / "config.toml").read_text("utf-8")))
    if data_stats is None and (run_dir / "data_stats.json").is_file():
        data_stats = json.loads((run_dir / "data_stats.json").read_text("utf-8"))
    if curves is None:
        curves = {
            name: Path(metrics[name]["train_log"])
            for name in metrics["models"]
            if metrics[name].get("train_log") and Path(metrics[name]["train_log"]).is_file()
        }
    return metrics, config, data_stats, dict(curves)


# ---------------------------------------------------------------------------------------------- pieces


def plot_curves(curves: Mapping[str, Mapping[str, list[tuple[int, float]]]]) -> bytes:
    """PNG, two panels sharing the step axis, every model in its own color: left, each student's own objective
    (train solid, validation dashed); right, validation hard CE (the same quantity for every student)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, sharex=True)
    for index, (name, curve) in enumerate(curves.items()):
        color = f"C{index}"
        for axis, key, style, label in (
            (left, "train", {"lw": 1.0}, f"{name} train"),
            (left, "val", {"lw": 1.6, "ls": "--", "marker": "o", "ms": 3}, f"{name} val"),
            (right, "val_hard_ce", {"lw": 1.6, "marker": "o", "ms": 3}, f"{name} val hard CE"),
        ):
            if curve.get(key):
                steps, values = zip(*curve[key], strict=True)
                axis.plot(steps, values, color=color, label=label, **style)
    left.set_title("Loss per step (each student's own objective)")
    right.set_title("Validation hard CE (comparable across students)")
    for axis in (left, right):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("nats / token")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _fmt(value: float | None, sign: bool = False) -> str:
    """4 decimals, or 3 significant digits below 0.001 (KL of close models is that small)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    plus = "+" if sign else ""
    if value != 0 and abs(value) < 1e-3:
        return f"{value:{plus}.2e}"
    return f"{value:{plus}.4f}"


def _cell(entry: Mapping[str, Any] | None) -> str:
    """value [interval], then the spread across seeds when there are several."""
    if not entry or entry.get("value") is None or math.isnan(entry["value"]):
        return "n/a"
    text = f"{_fmt(entry['value'])} [{_fmt(entry.get('ci_low'))}, {_fmt(entry.get('ci_high'))}]"
    if entry.get("spread") is not None and len(entry.get("seeds") or []) > 1:
        text += f" sd {_fmt(entry['spread'])}"
    return text


def metric_table(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per metric, a column per model, then a column per paired difference."""
    models = list(metrics["models"])
    diffs = list(metrics.get("differences", {}))
    header = ["metric", *models, *(f"{d.replace('-', ' − ')} (paired)" for d in diffs)]
    rows = []
    for key, (label, better) in METRIC_LABELS.items():
        row = [f"{label} ({better} is better)"]
        row += [_cell(metrics[m].get(key)) for m in models]
        row += [_cell(metrics["differences"][d].get(key)) for d in diffs]
        rows.append(row)
    return header, rows


def breakdown_table(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows per bucket of the teacher's top-k mass W: tokens, then each model's CE and KLs."""
    models = [m for m in metrics["models"] if metrics[m].get("by_teacher_mass")]
    keys = [k for k in ("ce", "full_kl_teacher_student", "kl_teacher_student")]
    header = [
        "teacher top-k mass W",
        "tokens",
        *(f"{m}: {METRIC_LABELS[k][0]}" for m in models for k in keys),
    ]
    rows = []
    if not models:
        return header, rows
    for index, bucket in enumerate(metrics[models[0]]["by_teacher_mass"]):
        row = [f"{bucket['low']:.2f} ≤ W < {bucket['high']:.2f}", f"{bucket['tokens']:,}"]
        row += [_cell(metrics[m]["by_teacher_mass"][index].get(k)) for m in models for k in keys]
        rows.append(row)
    return header, rows


def _verdict(name: str, entry: Mapping[str, Any], better: str, level: str) -> str:
    """The interval rule: "X is better" only when the interval (files and seeds) excludes 0 and more than one
    seed was trained; otherwise "no difference shown"."""
    value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
    a, b = name.split("-", 1)
    if any(x is None or math.isnan(x) for x in (value, low, high)):
        return f"{a} − {b}: not measurable on this held-out data"
    seeds = len(entry.get("seeds") or [])
    spread = f", sd across {seeds} seeds {_fmt(entry.get('spread'))}" if seeds > 1 else ""
    text = f"{a} − {b} = {_fmt(value, True)} ({level} CI [{_fmt(low, True)}, {_fmt(high, True)}]{spread})"
    if not (low > 0 or high < 0):
        return f"{text}: the interval includes 0, no difference shown"
    if seeds < 2:
        return (
            f"{text}: the interval excludes 0 over held-out files, but one training seed leaves training "
            "variance unmeasured: no difference shown"
        )
    winner = a if (value < 0) == (better == "lower") else b
    return f"{text}: the interval excludes 0, **{winner} is better**"


def result_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The headline sentences: the held-out set and how intervals are made, each paired difference of students
    on the headline metrics, what the full-vocabulary metrics could not give, and the teacher's self-check."""
    held = metrics.get("held_out", {})
    boot = metrics.get("bootstrap", {})
    level = f"{round(boot.get('confidence', 0.95) * 100)}%"
    seeds = metrics.get("seeds") or []
    lines = [
        f"Held-out: {held.get('documents', '?')} documents from {held.get('clusters', '?')} source files, "
        f"{held.get('tokens', '?')} tokens ({held.get('soft_tokens', '?')} with teacher top-k), never trained "
        "on; every token scored with its document's context up to each model's context length (no cut at "
        "a row boundary).",
        f"Intervals: {level}, {boot.get('samples', '?')} bootstrap replicates; {boot.get('method', '')} "
        f"Training seeds: {seeds or 'one'}.",
    ]
    for key in metrics_data_keys():
        entry = held.get(key)
        if entry:
            lines.append(f"{DATA_LABELS[key]}: {_cell(entry)}.")
    full = metrics.get("full_vocab", {})
    if full and not full.get("available"):
        lines.append(f"Not given: KL(teacher‖student) over the full vocabulary: {full.get('reason')}.")
    for name, diff in metrics.get("differences", {}).items():
        for key in HEADLINE:
            if key in diff:
                label, better = METRIC_LABELS[key]
                lines.append(f"{label}: {_verdict(name, diff[key], better, level)}.")
    for name in metrics["models"]:
        entry = metrics[name]
        if entry.get("role") == "teacher":
            kl, agree = entry["kl_teacher_student"]["value"], entry["top1_agreement"]["value"]
            own = (entry.get("full_kl_teacher_student") or {}).get("value")
            lines.append(
                f"Check: the teacher '{name}' against its own stored top-k on the held-out documents: KL over "
                f"top-k + tail bins = {_fmt(kl)} (the storage floor: rounding of the stored log-probabilities, "
                f"no context cut), top-1 agreement = {_fmt(agree)}"
                + (f"; its full-vocabulary KL to itself = {_fmt(own)}." if own is not None else ".")
            )
    return lines


DATA_LABELS = {
    "teacher_topk_mass_mean": "Teacher top-k mass W, mean over held-out positions",
    "actual_in_teacher_topk_rate": "Actual next token within the teacher's top-k",
}


def metrics_data_keys() -> tuple[str, ...]:
    return tuple(DATA_LABELS)


def _stats_rows(data_stats: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not data_stats:
        return []
    rows = []
    for key, value in data_stats.items():
        if isinstance(value, dict):
            text = ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in value.items())
        elif key == "alignment_coverage" and isinstance(value, (int, float)):
            text = f"{value:.2%}"
        elif isinstance(value, float):
            text = f"{value:.3f}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = str(value)
        rows.append((key.replace("_", " "), text))
    return rows


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------- renderers


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _code_block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text}\n{fence}"


NOTE = (
    "Cells: mean over training seeds [bootstrap interval over source files and seeds], then the standard "
    "deviation across seeds (sd) when there are several. Differences are paired: the same files and seeds for "
    "both models."
)


def render_markdown(
    title: str,
    metrics: Mapping[str, Any],
    config_text: str | None,
    data_stats: Mapping[str, Any] | None,
    plot_ref: str | None,
    training: Mapping[str, Any] | None = None,
) -> str:
    out = [f"# {title}", "", "## Result", ""]
    out += [f"- {line}" for line in result_lines(metrics) + training_lines(training)]
    out += ["", "## Held-out metrics", "", _md_table(*metric_table(metrics)), ""]
    out += [NOTE, ""]
    header, rows = breakdown_table(metrics)
    if rows:
        out += ["## By teacher confidence", "", _md_table(header, rows), ""]
    if training and training.get("students"):
        out += ["## Training", "", _md_table(*training_table(training)), ""]
        if training.get("sweep"):
            out += ["Learning-rate sweep (* kept):", "", _md_table(*sweep_table(training)), ""]
    if plot_ref:
        out += ["## Training curves", "", f"![training curves]({plot_ref})", ""]
    stats = _stats_rows(data_stats)
    if stats:
        out += ["## Data", "", _md_table(["", "value"], [list(r) for r in stats]), ""]
    if metrics.get("generations"):
        out += ["## Sample generations", "", "Greedy continuations of held-out prompts.", ""]
    for sample in metrics.get("generations", []):
        out += ["**Prompt**", "", _code_block(sample["prompt"]), ""]
        if sample.get("reference") is not None:
            out += ["*held-out text*", "", _code_block(sample["reference"]), ""]
        for name, text in sample["outputs"].items():
            out += [f"*{name}*", "", _code_block(text), ""]
    if config_text:
        out += ["## Config", "", "```toml", config_text.rstrip(), "```", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;
padding:0 1rem}
table{border-collapse:collapse;margin:0.5rem 0 1rem}th,td{border:1px solid #d0d7de;padding:4px 8px;
text-align:left;font-variant-numeric:tabular-nums}th{background:#f6f8fa}
pre{background:#f6f8fa;padding:8px;white-space:pre-wrap;word-break:break-word;margin:0}
.gen{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:8px;margin-bottom:1.5rem}
.gen h4{margin:0 0 4px}.note{color:#57606a;font-size:0.9em}img{max-width:100%}
"""


def _html_table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _bold(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def render_html(
    title: str,
    metrics: Mapping[str, Any],
    config_text: str | None,
    data_stats: Mapping[str, Any] | None,
    plot_png: bytes | None,
    training: Mapping[str, Any] | None = None,
) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<h2>Result</h2><ul id="result">',
        *(f"<li>{_bold(line)}</li>" for line in result_lines(metrics) + training_lines(training)),
        "</ul><h2>Held-out metrics</h2>",
        _html_table(*metric_table(metrics), table_id="metrics"),
        f'<p class="note">{html.escape(NOTE)}</p>',
    ]
    header, rows = breakdown_table(metrics)
    if rows:
        parts += ["<h2>By teacher confidence</h2>", _html_table(header, rows, table_id="breakdown")]
    if training and training.get("students"):
        parts += ["<h2>Training</h2>", _html_table(*training_table(training), table_id="training")]
        if training.get("sweep"):
            parts += [
                '<p class="note">Learning-rate sweep (* kept):</p>',
                _html_table(*sweep_table(training), table_id="sweep"),
            ]
    if plot_png:
        parts += [
            "<h2>Training curves</h2>",
            f'<img id="curves" alt="training curves" src="{_data_uri(plot_png)}">',
        ]
    stats = _stats_rows(data_stats)
    if stats:
        parts += ["<h2>Data</h2>", _html_table(["", "value"], [list(r) for r in stats], table_id="data")]
    generations = metrics.get("generations", [])
    if generations:
        parts.append(
            '<h2>Sample generations</h2><p class="note">Greedy continuations of held-out prompts.</p>'
        )
        parts.append('<div id="generations">')
        for sample in generations:
            columns = [("held-out text", sample["reference"])] if sample.get("reference") is not None else []
            columns += list(sample["outputs"].items())
            parts.append(f"<h4>Prompt</h4><pre>{html.escape(sample['prompt'])}</pre><div class='gen'>")
            parts += [f"<div><h4>{html.escape(n)}</h4><pre>{html.escape(t)}</pre></div>" for n, t in columns]
            parts.append("</div>")
        parts.append("</div>")
    if config_text:
        parts.append(f"<h2>Config</h2><details><summary>config.toml</summary><pre>{html.escape(config_text)}")
        parts.append("</pre></details>")
    parts.append(f'<p class="note">Generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- entry points


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _plot_for(curves: Mapping[str, Path]) -> bytes | None:
    loaded = {name: read_curves(path) for name, path in curves.items()}
    if not any(any(c.values()) for c in loaded.values()):
        return None
    return plot_curves(loaded)


def build_report(
    run_dir: Path,
    config: DistillConfig | None = None,
    data_stats: Mapping[str, Any] | None = None,
    curves: Mapping[str, Path] | None = None,
    title: str | None = None,
) -> ReportPaths:
    run_dir = Path(run_dir)
    metrics, config, data_stats, curve_paths = _load_inputs(run_dir, config, data_stats, curves)
    title = title or f"Distillation report: {run_dir.name}"
    config_text = _config_text(config)
    png = _plot_for(curve_paths)
    plot_path = run_dir / "curves.png" if png else None
    if png:
        _atomic_write(plot_path, png)
    training = _load_training(run_dir)
    markdown = render_markdown(
        title, metrics, config_text, data_stats, plot_path.name if png else None, training
    )
    _atomic_write(run_dir / "report.md", markdown.encode("utf-8"))
    page = render_html(title, metrics, config_text, data_stats, png, training)
    _atomic_write(run_dir / "report.html", page.encode("utf-8"))
    return ReportPaths(html=run_dir / "report.html", markdown=run_dir / "report.md", plot=plot_path)


def artifact_markdown(
    run_dir: Path,
    config: DistillConfig | None = None,
    data_stats: Mapping[str, Any] | None = None,
    curves: Mapping[str, Path] | None = None,
    title: str | None = None,
) -> str:
    """The Markdown report with the plot inline as a data URI (a Prefect artifact has no files beside it)."""
    run_dir = Path(run_dir)
    metrics, config, data_stats, curve_paths = _load_inputs(run_dir, config, data_stats, curves)
    png = _plot_for(curve_paths)
    title = title or f"Distillation report: {run_dir.name}"
    plot = _data_uri(png) if png else None
    return render_markdown(title, metrics, _config_text(config), data_stats, plot, _load_training(run_dir))


def compare_runs(run_a: Path, run_b: Path) -> str:
    """Markdown: every model both runs evaluated, metric by metric, with B − A.

    Intervals are per run; runs evaluated on different held-out data cannot be paired, so the difference has no
    interval of its own: read the two intervals.
    """
    a, b = load_metrics(Path(run_a)), load_metrics(Path(run_b))
    shared = [m for m in a["models"] if m in b["models"]]
    if not shared:
        raise ReportError(
            f"{run_a} and {run_b} have no model name in common ({a['models']} vs {b['models']})"
        )
    header = ["model", "metric", f"A: {Path(run_a).name}", f"B: {Path(run_b).name}", "B − A"]
    rows = []
    for model in shared:
        for key, (label, better) in METRIC_LABELS.items():
            ea, eb = a[model].get(key), b[model].get(key)
            known = ea and eb and ea.get("value") is not None and eb.get("value") is not None
            delta = eb["value"] - ea["value"] if known else math.nan
            rows.append([model, f"{label} ({better})", _cell(ea), _cell(eb), _fmt(delta)])
    ha, hb = a.get("held_out", {}), b.get("held_out", {})
    same = ha.get("snapshot_hash") is not None and ha.get("snapshot_hash") == hb.get("snapshot_hash")
    note = (
        "Same held-out snapshot in both runs."
        if same
        else "Held-out snapshots differ (or are unrecorded): compare with care."
    )
    return "\n".join(
        [f"# {Path(run_a).name} vs {Path(run_b).name}", "", _md_table(header, rows), "", note, ""]
    )


def append_eval_results(catalog: Path | Any, run_id: str, metrics: Mapping[str, Any]) -> int:
    """Append one row per (model, metric) to ``eval_results``; returns the rows written.

    ``catalog`` is a DuckDB file (e.g. ``storage.catalog``'s ``<data_dir>/catalog.duckdb``) or an open DuckDB
    connection (``Catalog(...).con``: DuckDB locks the file, so the process that holds the catalog passes its
    connection). The table is created if missing; a run recorded again has its rows replaced, in one
    transaction. The rows can always be rebuilt from the runs' ``metrics.json``.
    """
    import duckdb

    held = metrics.get("held_out", {})
    rows = [
        (
            run_id,
            model,
            metrics[model].get("role", "student"),
            key,
            metrics[model][key]["value"],
            metrics[model][key]["ci_low"],
            metrics[model][key]["ci_high"],
            held.get("tokens"),
            held.get("documents"),
            held.get("snapshot_hash"),
        )
        for model in metrics["models"]
        for key in METRIC_LABELS
        if key in metrics[model]
    ]
    own = not isinstance(catalog, duckdb.DuckDBPyConnection)
    con = duckdb.connect(str(catalog)) if own else catalog
    try:
        con.execute(
            """CREATE TABLE IF NOT EXISTS eval_results (
                run_id VARCHAR, model VARCHAR, role VARCHAR, metric VARCHAR, value DOUBLE, ci_low DOUBLE,
                ci_high DOUBLE, held_out_tokens BIGINT, held_out_sequences BIGINT, snapshot_hash VARCHAR,
                recorded_at TIMESTAMP DEFAULT current_timestamp)"""
        )
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM eval_results WHERE run_id = ?", [run_id])
            con.executemany(
                "INSERT INTO eval_results (run_id, model, role, metric, value, ci_low, ci_high, "
                "held_out_tokens, held_out_sequences, snapshot_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    finally:
        if own:
            con.close()
    return len(rows)
