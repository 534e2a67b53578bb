#!/usr/bin/env bash
# Regenerate the exporter fixtures under tests/fixtures/exporters/.
#
#   scripts/make_exporter_fixtures.sh [genai] [optimum] [olive]     (default: all three)
#
# One virtualenv per exporter is made under $FIXTURE_VENVS (default .fixture-venvs/
# at the repository root); torch==2.13.0 (CPU) is installed first in each, then the
# exporter with pinned versions, then the generator in scripts/fixtures/ is run.
# Set FIXTURE_SKIP_INSTALL=1 to reuse existing venvs without calling pip,
# FIXTURE_INSTALL_ONLY=1 to make the venvs and stop.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${FIXTURE_VENVS:-$ROOT/.fixture-venvs}"
PYTHON="${FIXTURE_PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
OUT="$ROOT/tests/fixtures/exporters"
GEN="$ROOT/scripts/fixtures"
mkdir -p "$VENVS" "$OUT"
export PYTHONHASHSEED=0           # optimum's decoder merge orders by set iteration
export OLIVE_DISABLE_TELEMETRY=1  # Olive would otherwise try to send telemetry
export HF_HUB_OFFLINE=1           # everything is local; never reach for the hub

# Pinned versions: the fixtures' README.txt files record what made them.
GENAI_PKGS=(onnxruntime-genai==0.18.0 onnxruntime==1.32.0 onnx==1.23.2 onnx-ir==1.1.0
            transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3 safetensors==0.8.0)
OPTIMUM_PKGS=(optimum-onnx==0.1.0 optimum==2.1.0 "transformers==4.57.6" peft==0.18.0
              onnx==1.23.2 onnxruntime==1.32.0)
# olive-ai 0.13.0 imports requests (its telemetry) without declaring it.
OLIVE_PKGS=(olive-ai==0.13.0 requests==2.34.2 onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0
            transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3 safetensors==0.8.0)

make_venv() {  # name pkgs...
  local name="$1"; shift
  local venv="$VENVS/$name"
  if [[ "${FIXTURE_SKIP_INSTALL:-0}" == 1 && -x "$venv/bin/python" ]]; then return; fi
  [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: a plain torch requirement would pull the CUDA build. The CPU wheel's
  # source can be given as in scripts/test.sh (ZFLORA_TORCH_INDEX_URL / ZFLORA_TORCH_FIND_LINKS).
  local torch_source=()
  [[ -n "${ZFLORA_TORCH_INDEX_URL:-}" ]] && torch_source+=(--index-url "$ZFLORA_TORCH_INDEX_URL")
  [[ -n "${ZFLORA_TORCH_FIND_LINKS:-}" ]] && torch_source+=(--find-links "$ZFLORA_TORCH_FIND_LINKS")
  "$venv/bin/python" -m pip install -q "${torch_source[@]}" torch==2.13.0
  # torch==2.13.0 is repeated so that no exporter requirement can move it.
  "$venv/bin/python" -m pip install -q torch==2.13.0 "$@"
  "$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
}

stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(genai optimum olive)

for stage in "${stages[@]}"; do
  echo "=== $stage"
  case "$stage" in
    genai)
      make_venv genai "${GENAI_PKGS[@]}"
      [[ "${FIXTURE_INSTALL_ONLY:-0}" == 1 ]] && continue
      "$VENVS/genai/bin/python" "$GEN/make_genai.py" --out "$OUT" ;;
    optimum)
      make_venv optimum "${OPTIMUM_PKGS[@]}"
      [[ "${FIXTURE_INSTALL_ONLY:-0}" == 1 ]] && continue
      "$VENVS/optimum/bin/python" "$GEN/make_optimum.py" --out "$OUT" ;;
    olive)
      make_venv olive "${OLIVE_PKGS[@]}"
      [[ "${FIXTURE_INSTALL_ONLY:-0}" == 1 ]] && continue
      "$VENVS/olive/bin/python" "$GEN/make_olive.py" --out "$OUT" ;;
    *) echo "unknown stage: $stage (genai|optimum|olive)" >&2; exit 2 ;;
  esac
done
[[ "${FIXTURE_INSTALL_ONLY:-0}" == 1 ]] && exit 0
echo "done: $OUT"
