"""The identity rule through the framework integrations: a run's ``metadata["user_id"]`` of any
type reaches the manager, which charges it by the rule (``0`` is ``"0"``, a list is bad input
charged to ``"anonymous"``)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_core")

import llmtally
from llmtally.langchain import LlmtallyCallbackHandler

from fakechat import FakeChat

QUESTION = "What is the capital of France?"


@pytest.mark.parametrize(
    ("given", "charged"), [(0, "0"), (42, "42"), (["bob"], "anonymous"), (True, "anonymous")]
)
async def test_a_langchain_run_user_id_of_any_type_is_charged_by_the_rule(
    given: Any, charged: str
) -> None:
    cost = llmtally.CostTracker()
    handler = LlmtallyCallbackHandler([cost], user_id="default")
    config: Any = {"callbacks": [handler], "metadata": {"user_id": given}}
    await FakeChat().ainvoke(QUESTION, config=config)
    assert list(cost.by_user()) == [charged]
