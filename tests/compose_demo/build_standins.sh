#!/usr/bin/env bash
# TEST SCAFFOLDING: build local stand-ins for flwr/superlink, flwr/supernode and flwr/superexec (same tags and
# entrypoints as the official images) with podman, for machines that cannot pull from a registry. Users of the
# compose demo never run this: docker/compose.yaml names the official images.
#   tests/compose_demo/build_standins.sh FLWR_VERSION WHEELHOUSE
# WHEELHOUSE holds flwr's wheels (pip download); the Debian root filesystem comes from debootstrap (cached in
# FEDPT_STANDIN_CACHE, default ~/.cache/fedpt-app/standins). Images that already exist are kept.
set -euo pipefail
version="${1:?usage: $0 FLWR_VERSION WHEELHOUSE}"
wheelhouse="$(cd "${2:?usage: $0 FLWR_VERSION WHEELHOUSE}" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${FEDPT_STANDIN_CACHE:-$HOME/.cache/fedpt-app/standins}"
have() { podman image exists "$1"; }

if ! have localhost/fedpt-standin-base:bookworm; then
  mkdir -p "$cache"
  if [ ! -x "$cache/rootfs/usr/bin/python3" ]; then
    echo "[standins] debootstrap: Debian bookworm with python3"
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$cache/rootfs" \
      http://deb.debian.org/debian > "$cache/debootstrap.log"
    rm -rf "$cache"/rootfs/var/cache/apt/archives/*.deb "$cache"/rootfs/var/lib/apt/lists/*
  fi
  tar -C "$cache/rootfs" -c . | podman import - localhost/fedpt-standin-base:bookworm > /dev/null
fi
if ! have "localhost/fedpt-standin-flwr:$version"; then
  echo "[standins] flwr $version on the base image"
  podman build -q --volume "$wheelhouse:/wheelhouse:ro" --build-arg "FLWR_VERSION=$version" \
    -t "localhost/fedpt-standin-flwr:$version" -f "$here/standin.Dockerfile" "$here" > /dev/null
fi
for component in superlink supernode superexec; do
  if ! have "docker.io/flwr/$component:$version"; then
    printf 'FROM localhost/fedpt-standin-flwr:%s\nENTRYPOINT ["flower-%s"]\n' "$version" "$component" |
      podman build -q -t "docker.io/flwr/$component:$version" -f - "$here" > /dev/null
  fi
done
echo "[standins] flwr/superlink, flwr/supernode, flwr/superexec:$version (stand-ins) ready"
