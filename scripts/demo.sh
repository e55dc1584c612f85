#!/usr/bin/env bash
# The default run: set up, pre-train the embedded tiny preset on first use, then `flwr run . --stream` on
# NUM_SUPERNODES (default 4) simulated clients through `fedpt-app simulate`, which checks the run's final status.
# Extra arguments go to `fedpt-app simulate`, e.g.: scripts/demo.sh --run-config "num-server-rounds=3"
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
fedpt-app prepare
fedpt-app simulate --num-supernodes "${NUM_SUPERNODES:-4}" "$@"
