#!/usr/bin/env bash
# The docker compose demo: one SuperLink, its ServerApp executor, and SUPERNODES (default 2) SuperNodes with their
# ClientApp executors, TLS and SuperNode authentication on.
#   SUPERNODES=3 docker/up.sh          # demo credentials, compose file for 3 SuperNodes, build, start
#   GPU=1 docker/up.sh                 # also give the ServerApp executor the host's GPUs (NVIDIA runtime)
#   CLIENTAPP_THREADS=4 docker/up.sh   # torch threads per ClientApp (default 1: the demo devices share one host)
#   PIP_OFFLINE=1 docker/up.sh         # build the executor image from docker/wheelhouse only (no package index)
# Compose: `docker compose` (v2) where installed, else `docker-compose` (v1, e.g. Debian's, also with podman).
# Then submit a run from the host (see docs/deployment.md), e.g.
#   flwr run . fedpt-docker --stream --run-config "output-dir='/outputs/demo'"
set -euo pipefail
cd "$(dirname "$0")"
nodes="${SUPERNODES:-2}"
bash ../scripts/make-certificates.sh credentials "$nodes"
if [ "$nodes" != 2 ]; then  # docker/compose.yaml holds 2; any other count is generated
  PYTHONPATH=.. python3 -c "import sys; from pathlib import Path; from fedpt_app.tools.compose import write_compose; \
write_compose(int(sys.argv[1]), Path('compose.yaml'))" "$nodes"
fi
mkdir -p outputs && chmod a+rwx outputs  # written by the containers' user (UID 49999)
files=(-f compose.yaml)
if [ -n "${GPU:-}" ]; then files+=(-f compose.gpu.yaml); fi
if docker compose version > /dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
"${compose[@]}" "${files[@]}" up --build -d
cat <<MSG
[fedpt-app] compose demo up with $nodes SuperNodes. Add this connection to \$FLWR_HOME/config.toml (default ~/.flwr):

[superlink.fedpt-docker]
address = "127.0.0.1:8000"
root-certificates = "$PWD/credentials/ca.crt"

then: flwr run .. fedpt-docker --stream --run-config "output-dir='/outputs/demo'"   (results in docker/outputs/demo)
MSG
