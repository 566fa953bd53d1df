"""The config model: defaults, round trip through the commented file, and clear errors."""

import subprocess
import tomllib

import pytest

from pipeline.config import ConfigError, DistillConfig, load_config, parse_config, render_config
from tests.support import PYTHON, ROOT, test_env


def test_every_field_has_a_description():
    def walk(model_cls, prefix):
        for name, info in model_cls.model_fields.items():
            assert info.description, f"{prefix}{name} has no description"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(DistillConfig, "")


def test_commented_default_round_trips():
    text = render_config(DistillConfig())
    assert parse_config(tomllib.loads(text)) == DistillConfig()
    assert "# Peak learning rate (AdamW)." in text


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'train\.stepz'"):
        load_config(path)


def test_bad_value_names_key_and_expectation(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[teacher]\nmode = "sample"\n[train]\nlr = -1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "key 'teacher.mode'" in message and "'generate' or 'score'" in message
    assert "key 'train.lr'" in message and "greater than 0" in message


def test_not_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_students_section_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[students.mix]\nkind = "soft"\nalpha = 0.5\n')
    config = load_config(path)
    assert set(config.students) == {"mix"} and config.students["mix"].alpha == 0.5


def test_cli_config_init_show_and_error_exit(tmp_path):
    target = tmp_path / "distill.toml"
    env = test_env()
    init = subprocess.run(
        [PYTHON, "-m", "pipeline.cli", "config", "init", str(target)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stderr
    show = subprocess.run(
        [PYTHON, "-m", "pipeline.cli", "config", "show", str(target)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert show.returncode == 0 and parse_config(tomllib.loads(show.stdout)) == DistillConfig()
    target.write_text("[model]\nhidden = 3\n")
    bad = subprocess.run(
        [PYTHON, "-m", "pipeline.cli", "config", "show", str(target)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown key 'model.hidden'" in bad.stderr
