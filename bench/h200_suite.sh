#!/usr/bin/env bash
# One device call: the test suite on the device image's torch / transformers / peft (CPU workers), its
# failures and summary into $OUT/suite.txt. Usage: bash bench/h200_suite.sh [PYTEST ARGS...] (limit ~400 s).
# The install is editable: a plain one leaves the checkout's graphlora/ first on the path, without passes/.
set -uo pipefail
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "graphlora install failed"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 500 python3 -m pytest -q -n 14 -p no:cacheprovider -rfE "${@:-tests}" > "$OUT/suite.txt" 2>&1
sed -n '/short test summary/,$p' "$OUT/suite.txt" | cut -c1-250
tail -1 "$OUT/suite.txt"
