#!/usr/bin/env bash
# The default run: set up, pre-train the embedded tiny preset on first use, then `flwr run .` on simulated clients.
# Extra arguments go to `flwr run`, e.g.: scripts/demo.sh --run-config "num-server-rounds=3"
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
fedpt-app prepare
trap 'fedpt-app stop-local-superlink' EXIT
flwr run . --stream \
  --federation-config "num-supernodes=${NUM_SUPERNODES:-4} client-resources-num-cpus=${CLIENT_CPUS:-1}" "$@"
