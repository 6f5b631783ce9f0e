#!/bin/bash
# ctest ttft_bench_smoke: run_transfer_bench.sh --ttft --smoke --json (two daemons in two network
# namespaces over a tbf-shaped veth, a small KV, every TTFT mode once), then checks that its JSON
# parses and that each mode's figures are consistent (TTFT = prefill + tail, budgets kept). The
# speed targets live in the full benchmark (docs/results/ttft.md), not here.
#   ttft_smoke_test.sh BIN_DIR
# Exit 77 (ctest SKIP_RETURN_CODE) when not root or when netns / veth / tc tbf are unavailable.
set -u
BIN=${1:?usage: ttft_smoke_test.sh BIN_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp /tmp/skv-ttft-smoke.XXXXXX)
trap 'rm -f "$OUT"' EXIT

timeout -s TERM 80 "$HERE/run_transfer_bench.sh" --ttft --smoke --json --bin "$BIN" >"$OUT"
rc=$?
if [ "$rc" -eq 77 ]; then
  echo "ttft_bench_smoke: SKIPPED (see the reason above)"
  exit 77
fi
[ "$rc" -eq 0 ] || { echo "ttft_bench_smoke: run_transfer_bench.sh --ttft exited with $rc"; exit 1; }
/usr/bin/python3 - "$OUT" <<'PY'
import json, math, sys
text = open(sys.argv[1]).read()
try:
    report = json.loads(text)
except ValueError as e:
    sys.exit("ttft_bench_smoke: --json output does not parse (%s): %r" % (e, text[:500]))
bad = []
want = ["fp16-bulk", "fp16-layerwise", "b0.5-layerwise", "b0.3-layerwise", "auto0.5-layerwise"]
got = [m.get("mode") for m in report.get("modes", [])]
if got != want:
    bad.append("modes %s != %s" % (got, want))
def positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
for m in report.get("modes", []):
    name = m.get("mode")
    for field in ("ttft_s", "prefill_s", "wire_bytes", "layer_wire_s", "ttft_over_fp16_bulk"):
        if not positive(m.get(field)):
            bad.append("%s.%s=%s is not a positive number" % (name, field, m.get(field)))
    if positive(m.get("ttft_s")) and positive(m.get("prefill_s")):
        if abs(m["ttft_s"] - m["prefill_s"] - m.get("tail_s", -1)) > 2e-3 or m["ttft_s"] < m["prefill_s"]:
            bad.append("%s: ttft %s != prefill %s + tail %s" % (name, m["ttft_s"], m["prefill_s"], m.get("tail_s")))
    limit = m["budget"] + 1e-9 if m.get("budget", 1) < 1 and not m.get("passthrough") else 1.01
    if not (0 < m.get("achieved_b", 0) <= limit):
        bad.append("%s: achieved_b=%s above %s" % (name, m.get("achieved_b"), limit))
    if m.get("layerwise") and not (m.get("signal_p99_us", -1) >= 0):
        bad.append("%s: no signal latency" % name)
print("  " + "\n  ".join("%-18s ttft %.3f s prefill %.3f s b %.4f" % (m["mode"], m["ttft_s"], m["prefill_s"], m["achieved_b"])
                         for m in report.get("modes", []) if positive(m.get("ttft_s"))))
if bad:
    sys.exit("ttft_bench_smoke: FAILED: " + "; ".join(bad))
print("ttft_bench_smoke: PASS")
PY
