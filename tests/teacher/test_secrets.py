"""The API key: from the environment or a Prefect Secret block, and scrubbed from log records."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from teacher.secrets import REDACTED, RedactingFilter, SecretError, redact, resolve_api_key
from teacher.settings import TeacherSettings
from tests.teacher.conftest import PLANTED_KEY


def test_key_from_the_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = TeacherSettings(api_key_env="DISTILL_TEST_KEY")
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    assert resolve_api_key(settings, required=False) is None
    with pytest.raises(SecretError, match="DISTILL_TEST_KEY") as error:
        resolve_api_key(settings, required=True)
    monkeypatch.setenv("DISTILL_TEST_KEY", PLANTED_KEY)
    assert resolve_api_key(settings, required=True) == PLANTED_KEY
    assert PLANTED_KEY not in str(error.value)


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("teacher.test_secrets")
    caplog.handler.addFilter(RedactingFilter(PLANTED_KEY))
    with caplog.at_level(logging.INFO):
        logger.info("Authorization: Bearer %s in %s", PLANTED_KEY, "headers")
    assert PLANTED_KEY not in caplog.text and f"Bearer {REDACTED} in headers" in caplog.text
    assert redact(f"x{PLANTED_KEY}y", None, PLANTED_KEY) == f"x{REDACTED}y"


@pytest.mark.slow
def test_key_from_a_prefect_secret_block(tmp_path: Path) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    isolated = {PREFECT_HOME: tmp_path, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(updates=isolated), prefect_test_harness(server_startup_timeout=120):
        Secret(value=PLANTED_KEY).save("teacher-key", overwrite=True)
        settings = TeacherSettings(api_key_env="DISTILL_UNSET_KEY", api_key_secret_block="teacher-key")
        assert resolve_api_key(settings, required=True) == PLANTED_KEY
        missing = TeacherSettings(api_key_secret_block="no-such-block")
        with pytest.raises(SecretError, match="no-such-block") as error:
            resolve_api_key(missing, required=True)
        assert PLANTED_KEY not in str(error.value)
