"""``llmtally.litellm`` is ``llmtally.integrations.litellm``, the same module: the integrations live
in one folder, and this import path stays."""

import sys

from llmtally.integrations import litellm as _module
from llmtally.integrations.litellm import *  # noqa: F403 (the public names, for type checkers)

sys.modules[__name__] = _module
