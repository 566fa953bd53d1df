"""Fixtures of the Prefect tests: one tiny project for the module, and an isolated Prefect (home, results,
database) so no test sees caches or runs left by another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline.tiny_project import TinyProject, make_tiny_project


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> TinyProject:
    return make_tiny_project(tmp_path_factory.mktemp("tiny-project"))


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    settings = {
        PREFECT_HOME: home,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "results",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(updates=settings), prefect_test_harness(server_startup_timeout=90):
        yield home
