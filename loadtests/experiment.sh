#!/usr/bin/env bash
# Peak-hour replay against the local cluster, fixed replicas vs autoscaling (docs/benchmarks.md).
#   bash loadtests/experiment.sh [minutes] [out-folder] [base-rate-per-min]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-4}
out=${2:-docs/loadtests}
rate=${3:-8}
for mode in fixed autoscaling; do
  rm -rf "/tmp/ditserve-experiment/$mode"
  .venv/bin/ditserve serve --config "loadtests/configs/$mode.yaml" --port 8140 --metrics-port 8141 \
    >"/tmp/ditserve-experiment-$mode.log" 2>&1 &
  server=$!
  until curl -sf http://127.0.0.1:8140/readyz >/dev/null; do sleep 1; done
  .venv/bin/ditserve loadtest --url http://127.0.0.1:8140 --metrics-url http://127.0.0.1:8141/metrics \
    --profile peak-hour --minutes "$minutes" --rate "$rate" --steps 100 --out "$out/$mode"
  kill -TERM "$server"; wait "$server" || true
done
