"""``llmtally.langchain`` is ``llmtally.integrations.langchain``, the same module: the
integrations live in one folder, and this import path stays."""

import sys

from llmtally.integrations import langchain as _module
from llmtally.integrations.langchain import *  # noqa: F403 (the public names, for type checkers)

sys.modules[__name__] = _module
