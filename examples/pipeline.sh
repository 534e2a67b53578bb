#!/usr/bin/env bash
# zcompile as a pre-deployment step: compile every adapted model, prove the rewrite exact, and
# stop the pipeline when the compiled model is slower than its base model on the target.
#
#   examples/pipeline.sh MODEL.onnx [TARGET] [MAX_OVERHEAD_PCT]
#
# Exit codes are zcompile's: 0 deploy, 1 verification or latency gate failed (do not deploy),
# 2 bad input or the target's runtime is missing (fix the job), 3 internal error (report a bug).
# The JSON report is written even on failure, for the pipeline's artifact store.
set -uo pipefail

model=${1:?usage: examples/pipeline.sh MODEL.onnx [TARGET] [MAX_OVERHEAD_PCT]}
target=${2:-ort}
max_overhead=${3:-2}
out="build/$(basename "${model%.onnx}")_${target}"
report="build/reports/$(basename "${model%.onnx}")_${target}.json"

zcompile compile "$model" -o "$out" --force --target "$target" \
    --check-latency --max-overhead "$max_overhead" \
    --quiet --report "$report"
status=$?

case $status in
  0) echo "deploy: $out (report: $report)" ;;
  1) echo "blocked: verification or latency gate failed; see $report and $out/latency.png if present" >&2 ;;
  2) echo "job error: bad input or missing target runtime; see $report" >&2 ;;
  *) echo "zcompile internal error ($status); see $report" >&2 ;;
esac
exit $status
