"""The run report: built by the real CLI from a real evaluation's metrics.json, rendered by headless chromium
(screenshot kept under test-artifacts/), self-contained, secrets redacted; and ``distill report compare``."""

import base64
import io
import json
import re
import shutil

import pytest

from pipeline.cli import main as distill
from pipeline.config import DistillConfig, render_config
from pipeline.report import artifact_markdown
from tests.evaluation.evalsupport import headless
from tests.support import ROOT

SECRET = "sk-test-DO-NOT-LEAK-42"


def _training_log(path, offset):
    """A log in student.train's metrics.jsonl format (one JSON object per line)."""
    lines = []
    for step in range(10, 101, 10):
        lines.append(
            {"step": step, "split": "train", "loss": 3.0 + offset - step / 100, "tokens": step * 512}
        )
        if step % 50 == 0:
            lines.append(
                {"step": step, "split": "val", "loss": 3.2 + offset - step / 120, "hard_ce": 3.4 - step / 110}
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def run_dir(evaluated_run, tmp_path):
    run = tmp_path / "run-2026"
    run.mkdir()
    document = json.loads((evaluated_run / "metrics.json").read_text())
    for name, offset in (("soft", 0.0), ("hard", 0.3)):
        _training_log(run / name / "metrics.jsonl", offset)
        document[name]["train_log"] = str(run / name / "metrics.jsonl")
    (run / "metrics.json").write_text(json.dumps(document))
    config = DistillConfig.model_validate({"local_teacher": {"api_key": SECRET}})
    (run / "config.toml").write_text(render_config(config))
    stats = {
        "samples": {"train": 1800, "val": 100, "test": 200},
        "tokens": {"train": 410_000, "val": 22_000, "test": 45_000},
        "storage_bytes_per_token": 41.5,
        "alignment_coverage": 0.9931,
        "collection_failures": 3,
        "cost_tokens": {"prompt": 480_000, "completion": 0},
    }
    (run / "data_stats.json").write_text(json.dumps(stats))
    return run


@pytest.mark.slow
def test_html_report_renders_in_chromium(run_dir, chromium, capsys):
    assert distill(["report", "build", str(run_dir)]) == 0
    html_path = run_dir / "report.html"
    assert capsys.readouterr().out.splitlines()[0] == str(html_path)
    page = html_path.read_text()
    assert SECRET not in page and SECRET not in (run_dir / "report.md").read_text()
    assert not re.search(r'(src|href)="https?:', page)  # self-contained: nothing fetched

    dom = headless(chromium, html_path.as_uri(), "--dump-dom")
    image = re.search(r'<img id="curves"[^>]*src="data:image/png;base64,([^"]+)"', dom)
    assert image, "plot image missing from the rendered DOM"
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(base64.b64decode(image.group(1))), format="png")
    assert pixels.shape[0] > 100 and pixels.std() > 0.01  # a real picture, not a blank
    table = re.search(r'<table id="metrics">(.*?)</table>', dom, re.S)
    assert table, "metric table missing from the rendered DOM"
    for text in ("soft", "hard", "teacher", "soft − hard (paired)", "KL(teacher‖student)", "perplexity"):
        assert text in table.group(1), text
    assert "Sample generations" in dom and "alignment coverage" in dom and "99.31%" in dom

    artifacts = ROOT / "test-artifacts" / "evaluation"
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    shot.unlink(missing_ok=True)
    headless(chromium, html_path.as_uri(), f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.copyfile(html_path, artifacts / "report.html")


@pytest.mark.slow
def test_markdown_report_and_artifact(run_dir):
    assert distill(["report", "build", str(run_dir)]) == 0
    markdown = (run_dir / "report.md").read_text()
    assert "![training curves](curves.png)" in markdown and (run_dir / "curves.png").is_file()
    assert "| metric | soft | hard | teacher | soft − hard (paired) |" in markdown
    assert "## Result" in markdown and "KL(teacher‖student)" in markdown
    inline = artifact_markdown(run_dir)
    assert "](data:image/png;base64," in inline and SECRET not in inline


@pytest.mark.slow
def test_report_compare_two_runs(run_dir, tmp_path, capsys):
    other = tmp_path / "run-2027"
    other.mkdir()
    document = json.loads((run_dir / "metrics.json").read_text())
    document["soft"]["ce"]["value"] += 0.5
    (other / "metrics.json").write_text(json.dumps(document))
    assert distill(["report", "compare", str(run_dir), str(other)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| soft | hard CE"))
    assert row.rstrip(" |").endswith("0.5000")
    assert "Same held-out snapshot in both runs." in out


def test_report_of_a_run_without_metrics_fails_clearly(tmp_path, capsys):
    assert distill(["report", "build", str(tmp_path)]) == 2
    assert "metrics.json: metrics file not found" in capsys.readouterr().err


def test_report_wording_follows_the_interval_rule():
    """ "X is better" only when the interval over files and seeds excludes 0 with more than one seed;
    otherwise "no difference shown"."""
    from pipeline.report import _verdict

    def verdict(low, high, seeds):
        entry = {"value": (low + high) / 2, "ci_low": low, "ci_high": high, "spread": 0.01, "seeds": seeds}
        return _verdict("soft-hard", entry, "lower", "95%")

    assert "**soft is better**" in verdict(-0.3, -0.1, [-0.2, -0.25, -0.15])
    assert "**hard is better**" in verdict(0.1, 0.3, [0.2, 0.1])
    for text in (verdict(-0.3, 0.1, [-0.1, -0.2, 0.0]), verdict(-0.3, -0.1, [-0.2])):
        assert "no difference shown" in text and "better" not in text
    assert "one training seed" in verdict(-0.3, -0.1, [-0.2])
