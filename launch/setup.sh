#!/usr/bin/env bash
# Installs ringtrain into the active Python (a virtual environment if one is active).
# torch is installed first and on its own: an already-installed build (CPU or CUDA)
# that satisfies pyproject's range is kept, so no second multi-GB torch is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # A local CPU wheel (pip's find-links) is preferred when the machine has one.
    "$PY" -m pip install --quiet "torch==2.13.0" || "$PY" -m pip install --quiet "torch>=2.4"
fi
"$PY" -m pip install --quiet -e ".[test]"
