from __future__ import annotations

from collections.abc import Iterator

import pytest

import llmtally
from llmtally import config


@pytest.fixture(autouse=True)
def _clean_globals() -> Iterator[None]:
    """Every test starts with no global callbacks and environment settings read afresh."""
    llmtally.set_global_callbacks([])
    config.settings(reload=True)
    yield
    llmtally.set_global_callbacks([])
    config.settings(reload=True)
