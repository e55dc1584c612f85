#!/usr/bin/env bash
# Set up and run the test suite (unit tests and end-to-end `flwr run .` simulations). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
