"""``llmtally.otel`` is ``llmtally.integrations.otel``, the same module: the integrations live
in one folder, and this import path stays."""

import sys

from llmtally.integrations import otel as _module
from llmtally.integrations.otel import *  # noqa: F403 (the public names, for type checkers)

sys.modules[__name__] = _module
