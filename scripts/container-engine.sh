#!/usr/bin/env bash
# A container engine for tests/test_compose_demo.py (run by .ci/run before the tests): Debian's podman serving the
# Docker API at /run/podman/podman.sock, with runc and docker-compose (v1). Checked on Debian 12 as root:
# podman's default runtime crun fails there on cgroups and its default ulimits cannot be set, hence the config.
# Does nothing where a Docker or podman socket already answers; where it cannot install (not root, no apt-get) it
# says so and exits 0, and the test skips with "no container engine". Exit status 0 and the line "engine ready" on
# stdout when an engine answers (.ci/run then requires the test to run, not skip).
set -uo pipefail
answers() { [ -S "$1" ] && [ "$(curl -s --max-time 5 --unix-socket "$1" http://engine/_ping)" = OK ]; }
for socket in /var/run/docker.sock /run/podman/podman.sock; do
  if answers "$socket"; then echo "[container-engine] engine ready: $socket"; exit 0; fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "[container-engine] none started: installing podman needs root and apt-get"
  exit 0
fi
# No recommends: docker-compose would pull in docker.io, whose daemon must not compete with podman for the socket.
packages=(podman runc docker-compose debootstrap curl netavark aardvark-dns containernetworking-plugins catatonit
  slirp4netns uidmap fuse-overlayfs)
install=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${packages[@]}")
if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" > /tmp/container-engine-apt.log 2>&1; then
  apt-get update -q -o DPkg::Lock::Timeout=300 > /dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive "${install[@]}" > /tmp/container-engine-apt.log 2>&1 ||
    { echo "[container-engine] apt-get install failed (/tmp/container-engine-apt.log)"; exit 0; }
fi
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > /etc/containers/containers.conf
fi
mkdir -p /run/podman
# From /: the service outlives this script, and the containers' monitor (conmon) inherits its working directory;
# started in a checkout that is later deleted (a CI clone), every later container fails to start.
cd /
nohup podman system service --time=0 unix:///run/podman/podman.sock > /tmp/podman-service.log 2>&1 &
for _ in $(seq 1 30); do
  if answers /run/podman/podman.sock; then echo "[container-engine] engine ready: podman, /run/podman/podman.sock"; exit 0; fi
  sleep 1
done
echo "[container-engine] podman did not start (/tmp/podman-service.log)"
