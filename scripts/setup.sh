#!/usr/bin/env bash
# Install everything deit-repro needs into .venv/ (idempotent; a second run takes seconds).
#   - Debian package dataset-fashion-mnist (the offline Fashion-MNIST, /usr/share/datasets/fashion-mnist)
#     when run as root; otherwise it says what to run.
#   - Debian package chromium (headless, for tests/test_snakemake_report.py, which opens the
#     Snakemake report in it) when run as root; otherwise that test is skipped.
#   - a virtual environment at .venv/ with the exact versions of requirements.lock (a pip
#     constraints file) and this package in editable mode, with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

apt_updated=
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  apt-get install -y -qq "$@" >/dev/null
}

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package dataset-fashion-mnist" >&2
    apt_install dataset-fashion-mnist
  else
    echo "setup: Fashion-MNIST is missing and this is not root: run" >&2
    echo "         sudo apt-get install dataset-fashion-mnist" >&2
    echo "       or prepare from a directory holding the four IDX files:" >&2
    echo "         deit-repro prepare --dataset fashion_mnist --source-dir DIR --out ..." >&2
  fi
fi

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package chromium (the report test's browser)" >&2
    apt_install chromium
  else
    echo "setup: chromium is missing and this is not root: the report test will be skipped; run" >&2
    echo "         sudo apt-get install chromium" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the lock or the project metadata changed since the last install.
stamp=.venv/.deit-repro-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing pinned dependencies (requirements.lock)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -r requirements.lock
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, torchvision, timm, dvc, snakemake, submitit, deit_repro" \
  || { echo "setup: the environment in .venv is broken; delete .venv and re-run" >&2; exit 1; }
echo "setup: ready (.venv: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))" >&2
