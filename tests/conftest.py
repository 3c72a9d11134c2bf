from __future__ import annotations

from collections.abc import Iterator

import pytest

import llmtally
from llmtally import config


@pytest.fixture(autouse=True)
def _private_default_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test (nor a command it runs) touches the user's real default store."""
    for var in ("LLMTALLY_STORE", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture(autouse=True)
def _clean_globals() -> Iterator[None]:
    """Every test starts with no global callbacks and environment settings read afresh."""
    llmtally.set_global_callbacks([])
    config.settings(reload=True)
    yield
    llmtally.set_global_callbacks([])
    config.settings(reload=True)
