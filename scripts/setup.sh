#!/usr/bin/env bash
# Create .venv and install bitfast's requirements (and, with --test, the test-only references). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's warnings about this machine's local index folders are noise; its errors still show and still fail.
# --no-warn-conflicts: requirements-nodeps.txt is installed without its dependencies on purpose, and pip's
# after-install check would call that an "ERROR" on every install; a requirement that cannot be resolved still fails.
pip_install() {
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-warn-conflicts "$@" \
    2> >(grep -v "^WARNING: Location" >&2)
}
pip_install -r requirements.txt
pip_install --no-deps $(grep -o '^[a-z0-9-]*' requirements-nodeps.txt)
if [ "${1:-}" = "--test" ]; then
  pip_install -r requirements-test.txt
fi
.venv/bin/python -c "import torch, gguf, tiktoken, safetensors" || { echo "error: setup failed" >&2; exit 1; }
