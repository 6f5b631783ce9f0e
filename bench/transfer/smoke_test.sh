#!/bin/bash
# ctest transfer_bench_smoke: run_transfer_bench.sh --smoke --json (two daemons in two network
# namespaces over a tbf-shaped veth, a short ucx_perftest, a small KV), then checks that its JSON
# parses and that every headline field is a positive finite number.
#   smoke_test.sh BIN_DIR
# Exit 77 (ctest SKIP_RETURN_CODE) when not root or when netns / veth / tc tbf are unavailable.
set -u
BIN=${1:?usage: smoke_test.sh BIN_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp /tmp/skv-bench-smoke.XXXXXX)
trap 'rm -f "$OUT"' EXIT

# The bench bounds each of its own steps; this outer bound stays under ctest's TIMEOUT so the
# bench's own cleanup (namespaces, daemons) still runs when it is hit.
timeout -s TERM 80 "$HERE/run_transfer_bench.sh" --smoke --json --bin "$BIN" >"$OUT"
rc=$?
if [ "$rc" -eq 77 ]; then
  echo "transfer_bench_smoke: SKIPPED (see the reason above)"
  exit 77
fi
[ "$rc" -eq 0 ] || { echo "transfer_bench_smoke: run_transfer_bench.sh exited with $rc"; exit 1; }
/usr/bin/python3 - "$OUT" <<'PY'
import json, math, sys
text = open(sys.argv[1]).read()
try:
    report = json.loads(text)
except ValueError as e:
    sys.exit("transfer_bench_smoke: --json output does not parse (%s): %r" % (e, text[:500]))
bad = []
for field in ("perftest_gbps", "passthrough_fraction", "ratio_b05", "ratio_b03", "passthrough_seconds"):
    v = report.get(field)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    print("  %-22s %s%s" % (field, v, "" if ok else "   <-- not a positive number"))
    if not ok:
        bad.append(field)
for t in report.get("transfers", []):
    # Compressed transfers never exceed their budget; passthrough carries segment headers on top
    # of the raw rows, so it lands just above 1.
    limit = t["budget"] + 1e-9 if t["budget"] < 1 else 1.01
    if not (t.get("achieved_b", 0) > 0 and t["achieved_b"] <= limit and t.get("seconds", 0) > 0):
        bad.append("transfers[b=%s]: achieved_b=%s seconds=%s" % (t.get("budget"), t.get("achieved_b"), t.get("seconds")))
    runs = t.get("all_seconds")
    if not (isinstance(runs, list) and runs and abs(min(runs) - t.get("seconds", -1)) < 1e-3):
        bad.append("transfers[b=%s]: all_seconds=%s does not hold the fastest run %s" % (
            t.get("budget"), runs, t.get("seconds")))
if len(report.get("transfers", [])) != 3:
    bad.append("expected 3 transfers (b=1, 0.5, 0.3), got %d" % len(report.get("transfers", [])))
if bad:
    sys.exit("transfer_bench_smoke: FAILED: " + ", ".join(bad))
print("transfer_bench_smoke: PASS")
PY
