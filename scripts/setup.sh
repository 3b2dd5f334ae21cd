#!/usr/bin/env bash
# Create .venv (if absent) and install pyro_dlatent with its test tools.
#
# Torch is installed first, as a CPU build, so that pip never pulls a multi-GB CUDA build:
# a locally provided wheel of torch==$TORCH_VERSION is used when pip can find one; otherwise the
# CPU wheel comes from $TORCH_INDEX_URL (PyTorch's CPU index by default). For a GPU machine,
# install the torch build you want into .venv first, then run this script: an installed torch
# that satisfies the package's range is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if "${PIP[@]}" install --no-index --no-deps "torch==${TORCH_VERSION}" >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==${TORCH_VERSION}"
  else
    "${PIP[@]}" install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
  fi
fi
"${PIP[@]}" install -e ".[test]"
.venv/bin/python -c "import torch, pyro_dlatent; print('pyro_dlatent', pyro_dlatent.__version__, 'torch', torch.__version__)"
