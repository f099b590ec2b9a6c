#!/usr/bin/env bash
# One device call: install graphlora (and carried wheels in .whl/), then run the named benchmarks,
# each under its own time limit, logs and JSON into $OUT. Usage: bash bench/h200_run.sh SECONDS:SCRIPT:ARGS ...
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation . >/dev/null 2>&1 || echo "graphlora install failed"
nvidia-smi -L
for job in "$@"; do
  limit=${job%%:*}; rest=${job#*:}; script=${rest%%:*}; args=${rest#*:}
  tag=$(basename "$script" .py)$(echo "$args" | tr -c 'a-zA-Z0-9' '_' | cut -c1-90)
  echo "=== $script $args (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" python3 "$script" $args --out "$OUT/$tag.json" 2>&1 | tee "$OUT/$tag.log" | grep -v "^ \{2,\}" | tail -60
  echo "=== $script took $(( $(date +%s) - start ))s"
done
