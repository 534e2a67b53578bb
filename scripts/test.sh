#!/usr/bin/env bash
# The test command: installs the CPU torch wheel first (a plain `torch` requirement would pull
# several GB of CUDA packages), then the package with its torch and test extras, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[torch,test,qnn]'
python -m pytest -q "$@"
