#!/usr/bin/env bash
# zcompile as a pre-deployment step: compile every adapted model, prove the rewrite exact, and
# stop the pipeline when the compiled model is slower than its base model on the target.
#
#   examples/pipeline.sh MODEL.onnx [TARGET] [MAX_OVERHEAD_PCT]
#
# Exit codes are zcompile's: 0 deploy, 1 verification failed or the latency gate found a
# regression (do not deploy), 2 bad input or the target's runtime is missing (fix the job),
# 3 internal error (report a bug), 4 the latency gate is inconclusive (the interval straddles the
# threshold: this script blocks; set ZCOMPILE_ALLOW_INCONCLUSIVE=1 to deploy anyway).
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
  4) if [[ "${ZCOMPILE_ALLOW_INCONCLUSIVE:-0}" == 1 ]]; then
       echo "deploy (latency gate inconclusive, allowed): $out (report: $report)"; status=0
     else
       echo "blocked: latency gate inconclusive (noise too high to tell); see $report and $out/latency.png" >&2
     fi ;;
  *) echo "zcompile internal error ($status); see $report" >&2 ;;
esac
exit $status
