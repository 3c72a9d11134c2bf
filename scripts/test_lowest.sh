#!/usr/bin/env bash
# The suite against the lowest versions pyproject.toml declares (its `>=` bounds are real):
# a fresh venv, every direct dependency at its lower bound (uv's lowest-direct resolution; what
# they pull in at its newest), then the whole suite. The test extra's litellm needs a newer openai
# than the [openai] extra's bound, so that bound is checked on its own after, on the SDK tests.
# Usage: scripts/test_lowest.sh [VENV_DIR]   (needs `uv`: pip install uv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lowest}
uv venv --python "${PYTHON:-python3}" "$venv"
uv pip install --python "$venv" --resolution lowest-direct -e '.[test]'
uv pip list --python "$venv"
"$venv/bin/python" -m pytest
openai_bound=$("$venv/bin/python" - <<'PY'
import re, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print(re.fullmatch(r"openai>=([\w.]+)", extras["openai"][0]).group(1))
PY
)
uv pip install --python "$venv" "openai==$openai_bound"
"$venv/bin/python" -m pytest tests/integration/test_instrument.py
