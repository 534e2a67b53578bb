#!/usr/bin/env bash
# The test command: installs the CPU torch wheel first (a plain `torch` requirement would pull
# several GB of CUDA packages), then the package with its torch and test extras, then pytest.
#
# Where the CPU wheel comes from: on the public index (pypi.org) `torch==2.13.0` resolves to the
# CUDA build, so point this pip install at PyTorch's CPU index or at a directory of wheels:
#   ZFLORA_TORCH_INDEX_URL   passed as --index-url,  e.g. https://download.pytorch.org/whl/cpu
#   ZFLORA_TORCH_FIND_LINKS  passed as --find-links, e.g. a directory holding the CPU wheel
# Unset (the default), pip's own configuration decides (PIP_INDEX_URL, pip.conf: a mirror that
# serves the CPU build); the line printed before the install says which source was used.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_source=()
if [[ -n "${ZFLORA_TORCH_INDEX_URL:-}" ]]; then
    torch_source+=(--index-url "$ZFLORA_TORCH_INDEX_URL")
fi
if [[ -n "${ZFLORA_TORCH_FIND_LINKS:-}" ]]; then
    torch_source+=(--find-links "$ZFLORA_TORCH_FIND_LINKS")
fi
if (( ${#torch_source[@]} )); then
    echo "scripts/test.sh: torch==2.13.0 with ${torch_source[*]}" >&2
    python -m pip install -q "${torch_source[@]}" torch==2.13.0
else
    echo "scripts/test.sh: torch==2.13.0 from pip's configured index (set ZFLORA_TORCH_INDEX_URL for the CPU wheel)" >&2
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e '.[torch,test,qnn]'
python -m pytest -q "$@"
