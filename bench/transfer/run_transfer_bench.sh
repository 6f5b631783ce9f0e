#!/bin/bash
# Transfer benchmark over a shaped link (DESIGN 7): two network namespaces joined by a veth pair,
# both directions shaped with tc tbf; ucx_perftest gives the line rate of that link; then one
# spectrumkvd per namespace and `skvctl bench` (run in the sender's namespace) times FP16
# passthrough and compressed transfers of a 7B-shaped KV.
#
#   run_transfer_bench.sh [--rate 1gbit] [--tokens 2048] [--layers 32] [--kv_heads 8] [--head_dim 128]
#                         [--budgets 1,0.5,0.3] [--repeats 2] [--burst 256kb] [--json] [--smoke]
#                         [--bin DIR] [--logs DIR] [--perftest-test tag_bw] [--perftest-size BYTES]
#                         [--passthrough never|auto]
#   run_transfer_bench.sh --ttft [--rate R] [--layer_ms 8] [--modes fp16-bulk,b0.5-layerwise,...]
#                         [--tokens 4096] [--layers 32] [--repeats 3] [--json] [--smoke]
#
#   --ttft    instead of `skvctl bench`, `skvctl ttft`: a simulated prefill (--layer_ms per layer)
#             and the KV's transfer, one Send after prefill versus a SendStream signalled as each
#             layer ends; reports time to the KV on the decode side (TTFT's transfer share), the
#             tail after the last layer against one layer's wire time, and the signal latency.
#
#   --smoke   4 layers, 512 tokens, 1 repeat, ~1 s of ucx_perftest with 4 MiB messages: checks
#             the plumbing (and the JSON fields) in about 5-10 s; the numbers mean little.
#   --json    one JSON object on stdout (progress goes to stderr either way).
#   --passthrough  for budgets < 1: never (default; the codec always runs) or auto (the daemon
#             sends FP16 rows when it estimates the link is faster than the codec).
#   --bin     directory with spectrumkvd and skvctl (default: the repo's build/bin, else
#             build-daemon/bin).
#   --logs    copy the daemons' logs, perftest and skvctl output there (default: discarded
#             unless something fails, then their tails are printed).
#
# Exit codes: 0 done; 1 a step failed; 2 bad arguments; 77 skipped: not root, or network
# namespaces / veth / tc tbf unavailable here. Every step is bounded by a timeout, and the
# namespaces (and with them the veth pair and its qdiscs) and every process started here are
# removed on every exit path.
set -u
set -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

RATE=1gbit BURST=256kb TOKENS=2048 LAYERS=32 KV_HEADS=8 HEAD_DIM=128 BUDGETS=1,0.5,0.3 REPEATS=2
JSON=0 SMOKE=0 BIN="" LOGS="" PASSTHROUGH=never PERFTEST_TEST=tag_bw PERFTEST_SIZE=16777216 PERFTEST_SECONDS=4
TTFT=0 LAYER_MS=8 MODES=fp16-bulk,fp16-layerwise,b0.5-layerwise,b0.3-layerwise,auto0.5-layerwise
TOKENS_SET=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  arg=$1; shift
  case "$arg" in
    --*=*) set -- "${arg#*=}" "$@"; arg=${arg%%=*} ;;
  esac
  case "$arg" in
    --rate) RATE=$1; shift ;;
    --burst) BURST=$1; shift ;;
    --tokens) TOKENS=$1; TOKENS_SET=1; shift ;;
    --ttft) TTFT=1 ;;
    --layer_ms) LAYER_MS=$1; shift ;;
    --modes) MODES=$1; shift ;;
    --layers) LAYERS=$1; shift ;;
    --kv_heads) KV_HEADS=$1; shift ;;
    --head_dim) HEAD_DIM=$1; shift ;;
    --budgets) BUDGETS=$1; shift ;;
    --repeats) REPEATS=$1; shift ;;
    --bin) BIN=$1; shift ;;
    --logs) LOGS=$1; shift ;;
    --perftest-test) PERFTEST_TEST=$1; shift ;;
    --perftest-size) PERFTEST_SIZE=$1; shift ;;
    --passthrough) PASSTHROUGH=$1; shift ;;
    --json) JSON=1 ;;
    --smoke) SMOKE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_transfer_bench.sh: unknown argument '$arg' (--help)" >&2; exit 2 ;;
  esac
done
case "$PASSTHROUGH" in never|auto) ;; *) echo "run_transfer_bench.sh: --passthrough must be never or auto" >&2; exit 2 ;; esac
# TTFT's default prompt is the production figure the layer time stands for: 4K tokens.
if [ "$TTFT" = 1 ] && [ "$TOKENS_SET" = 0 ]; then TOKENS=4096; fi
if [ "$SMOKE" = 1 ]; then LAYERS=4 TOKENS=512 REPEATS=1 PERFTEST_SIZE=4194304 PERFTEST_SECONDS=1; fi
[[ "$LAYER_MS" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "--layer_ms: expected a number of milliseconds" >&2; exit 2; }

log() { echo "[transfer-bench] $*" >&2; }
skip() { echo "run_transfer_bench.sh: SKIP: $*" >&2; exit 77; }
die() { echo "run_transfer_bench.sh: FAILED: $*" >&2; exit 1; }

# ---- preconditions ------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "refusing to run: needs root (network namespaces, veth, tc); try sudo"
command -v ip >/dev/null || skip "iproute2 'ip' not found"
command -v tc >/dev/null || skip "'tc' not found (iproute2)"
ip netns list >/dev/null 2>&1 || skip "'ip netns' is unavailable here"
[[ "$RATE" =~ ^([0-9]+([.][0-9]+)?)([kmg]?)bit$ ]] || { echo "--rate: expected e.g. 500mbit, 1gbit, 10gbit" >&2; exit 2; }
RATE_BPS=$(awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]}" \
  'BEGIN { m = (u == "k") ? 1e3 : (u == "m") ? 1e6 : (u == "g") ? 1e9 : 1; printf "%.0f", n * m }')
for v in TOKENS LAYERS KV_HEADS HEAD_DIM REPEATS PERFTEST_SIZE; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "--${v,,}: expected a positive integer" >&2; exit 2; }
done
if [ -z "$BIN" ]; then
  BIN=$REPO/build/bin
  [ -x "$BIN/spectrumkvd" ] || BIN=$REPO/build-daemon/bin
fi
for b in spectrumkvd skvctl; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not found (build it: ninja -C build spectrumkvd skvctl, or pass --bin DIR)"
done
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3) || die "python3 is needed to assemble the report"
command -v ucx_perftest >/dev/null || die "ucx_perftest not found (Debian: ucx-utils)"


# ---- state and cleanup --------------------------------------------------------------------------
ID=$$
NS_A=skvA$ID NS_B=skvB$ID
VETH_A=vskvA$ID VETH_B=vskvB$ID
SUBNET=10.77.$((ID % 200 + 20))
ADDR_A=$SUBNET.1 ADDR_B=$SUBNET.2
WORK=$(mktemp -d /tmp/skv-transfer-bench.XXXXXX)
PIDS=()          # every background process started here (skvctl's shm objects go with them)
NS_MADE=()

exec 9>&2  # the script's stderr, for the cleanup: a trap can fire inside a redirected `bounded`
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  exec 2>&9
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do rm -f "/dev/shm/skvctl-$pid-src" "/dev/shm/skvctl-$pid-dst"; done
  for ns in "${NS_MADE[@]}"; do
    # Nothing of ours should be left inside; anything still there was started by this script.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  if [ -n "$LOGS" ]; then
    mkdir -p "$LOGS" && cp -f "$WORK"/* "$LOGS"/ 2>/dev/null
  fi
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
    for f in "$WORK"/*.log "$WORK"/*.out "$WORK"/*.err; do
      [ -s "$f" ] && { echo "---- $(basename "$f") (last 30 lines)"; tail -n 30 "$f"; } >&2
    done
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs "$@" in the background, bounded by $1 seconds (TERM, then KILL 5 s later); returns its
# exit status (124 on timeout). LAST_PID is its PID.
bounded() {
  local limit=$1; shift
  "$@" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  local pid=$LAST_PID
  ( for ((i = 0; i < limit * 10; i++)); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    echo "[transfer-bench] timeout after ${limit}s: $*" >&2
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null ) &
  local watchdog=$!
  wait "$pid"
  local rc=$?
  wait "$watchdog" 2>/dev/null
  [ "$rc" -eq 143 ] || [ "$rc" -eq 137 ] && rc=124
  return "$rc"
}

# ---- the link -----------------------------------------------------------------------------------
log "namespaces $NS_A/$NS_B, veth $VETH_A ($ADDR_A) <-> $VETH_B ($ADDR_B), tbf $RATE burst $BURST both ways"
# Names carry this shell's PID, so no live run can own them: existing ones were left by a run
# that was killed (SIGKILL skips the cleanup) and had the same PID. Their names are removed.
for ns in "$NS_A" "$NS_B"; do
  if ip netns list 2>/dev/null | grep -qw "$ns"; then
    log "removing stale namespace $ns (a killed earlier run with PID $ID)"
    ip netns del "$ns" 2>/dev/null
  fi
done
timeout 10 ip netns add "$NS_A" 2>"$WORK/netns.err" || skip "cannot create a network namespace: $(cat "$WORK/netns.err")"
NS_MADE+=("$NS_A")
timeout 10 ip netns add "$NS_B" 2>"$WORK/netns.err" || skip "cannot create a network namespace: $(cat "$WORK/netns.err")"
NS_MADE+=("$NS_B")
timeout 10 ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B" 2>"$WORK/veth.err" \
  || skip "cannot create a veth pair: $(cat "$WORK/veth.err")"
setup_side() {  # ns veth addr
  timeout 10 ip -n "$1" addr add "$3/24" dev "$2" &&
    timeout 10 ip -n "$1" link set "$2" up &&
    timeout 10 ip -n "$1" link set lo up
}
setup_side "$NS_A" "$VETH_A" "$ADDR_A" || die "configuring $VETH_A"
setup_side "$NS_B" "$VETH_B" "$ADDR_B" || die "configuring $VETH_B"
for side in "$NS_A $VETH_A" "$NS_B $VETH_B"; do
  set -- $side
  timeout 10 ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst "$BURST" latency 50ms \
    2>"$WORK/tc.err" || skip "tc tbf unavailable: $(cat "$WORK/tc.err")"
done
# Both ends must report carrier (UCX ignores an interface that is not RUNNING; the kernel sets it
# up to a second after `link set up`, later under load) and the link must carry traffic.
link_up=0
for _ in $(seq 100); do
  if ip -n "$NS_A" -o link show dev "$VETH_A" | grep -q "state UP" &&
     ip -n "$NS_B" -o link show dev "$VETH_B" | grep -q "state UP"; then
    link_up=1; break
  fi
  sleep 0.1
done
[ "$link_up" = 1 ] || die "the veth pair has no carrier after 10 s"
link_up=0
for _ in $(seq 50); do
  probe=$(timeout 2 ip netns exec "$NS_A" bash -c "exec 3<>/dev/tcp/$ADDR_B/1" 2>&1)
  case "$probe" in *refused*) link_up=1; break ;; esac  # B answered (RST): the link works
  sleep 0.1
done
[ "$link_up" = 1 ] || die "the veth link does not carry traffic"

UCX_ENV_A=(env UCX_TLS=tcp "UCX_NET_DEVICES=$VETH_A")
UCX_ENV_B=(env UCX_TLS=tcp "UCX_NET_DEVICES=$VETH_B")
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- ucx_perftest: the line rate of this link ---------------------------------------------------
PERFTEST_MIBPS=""
# About PERFTEST_SECONDS of traffic at the shaped rate (at least 10 messages, at most 400).
PERFTEST_ITERS=$(awk -v r="$RATE_BPS" -v s="$PERFTEST_SIZE" -v t="$PERFTEST_SECONDS" \
  'BEGIN { n = int(r / 8 * t / s); if (n < 10) n = 10; if (n > 400) n = 400; print n }')
PORT=13337
log "ucx_perftest -t $PERFTEST_TEST -s $PERFTEST_SIZE -n $PERFTEST_ITERS over $VETH_A -> $VETH_B"
ip netns exec "$NS_B" timeout 150 "${UCX_ENV_B[@]}" ucx_perftest -t "$PERFTEST_TEST" -s "$PERFTEST_SIZE" \
  -n "$PERFTEST_ITERS" -w 2 -p "$PORT" >"$WORK/perftest-server.out" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
listening=0
for _ in $(seq 100); do  # wait for the server's socket (never connect to it: it takes one client)
  kill -0 "$SERVER_PID" 2>/dev/null || die "ucx_perftest server exited at start"
  if ip netns exec "$NS_B" ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q .; then listening=1; break; fi
  sleep 0.1
done
[ "$listening" = 1 ] || die "ucx_perftest server is not listening on port $PORT"
bounded 120 ip netns exec "$NS_A" "${UCX_ENV_A[@]}" ucx_perftest "$ADDR_B" -t "$PERFTEST_TEST" \
  -s "$PERFTEST_SIZE" -n "$PERFTEST_ITERS" -w 2 -p "$PORT" >"$WORK/perftest-client.out" 2>&1 \
  || die "ucx_perftest client failed"
for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
# Final line: iterations, latency p50/avg/overall (us), bandwidth avg/overall (MB/s, UCX's MB =
# 2^20 bytes), message rate avg/overall.
PERFTEST_MIBPS=$(awk '/Final:/ { print $7 }' "$WORK/perftest-client.out" | tail -n 1)
[ -n "$PERFTEST_MIBPS" ] || PERFTEST_MIBPS=$(awk 'NF == 8 && $1 ~ /^[0-9]+$/ { v = $6 } END { print v }' "$WORK/perftest-client.out")
[ -n "$PERFTEST_MIBPS" ] || die "could not read a bandwidth from ucx_perftest's output"
log "ucx_perftest: $PERFTEST_MIBPS MiB/s"

# ---- the daemons --------------------------------------------------------------------------------
TOKEN=bench-$ID-$RANDOM
start_daemon() {  # ns veth id addr peers log
  local ns=$1 veth=$2 id=$3 addr=$4 peers=$5 logf=$6
  ip netns exec "$ns" "$BIN/spectrumkvd" --daemon_id="$id" --grpc_listen_address="$addr:50551" \
    --data_listen_address="$addr:50552" --metrics_listen_address="$addr:50553" --auth_token="$TOKEN" \
    --ucx_tls=tcp --ucx_net_devices="$veth" ${peers:+--peers=$peers} \
    --allow_insecure_grpc >"$logf" 2>&1 &  # plaintext gRPC only inside the bench's private namespaces
  PIDS+=($!)
  DAEMON_PIDS+=($!)
}
DAEMON_PIDS=()
start_daemon "$NS_B" "$VETH_B" decode "$ADDR_B" "prefill=$ADDR_A:50552" "$WORK/decode.log"
start_daemon "$NS_A" "$VETH_A" prefill "$ADDR_A" "decode=$ADDR_B:50552" "$WORK/prefill.log"
ready=0
for _ in $(seq 200); do
  for pid in "${DAEMON_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || die "spectrumkvd (pid $pid) exited at start"; done
  if grep -q "spectrumkvd ready" "$WORK/decode.log" && grep -q "spectrumkvd ready" "$WORK/prefill.log"; then
    ready=1; break
  fi
  sleep 0.1
done
[ "$ready" = 1 ] || die "the daemons did not become ready in 20 s"
log "spectrumkvd prefill $ADDR_A:50551 (pid ${DAEMON_PIDS[1]}), decode $ADDR_B:50551 (pid ${DAEMON_PIDS[0]})"

# ---- skvctl ttft (--ttft) -----------------------------------------------------------------------
if [ "$TTFT" = 1 ]; then
  RAW_BYTES=$((LAYERS * 2 * TOKENS * KV_HEADS * HEAD_DIM * 2))
  NM=$(echo "$MODES" | tr ',' '\n' | grep -c .)
  TTFT_LIMIT=$(awk -v b="$RAW_BYTES" -v r="$RATE_BPS" -v n="$((NM * REPEATS))" \
    'BEGIN { t = 60 + n * (b * 8 / r) * 10; if (t > 3000) t = 3000; printf "%d", t }')
  log "skvctl ttft: $LAYERS layers x $TOKENS tokens x $KV_HEADS heads x $HEAD_DIM dims FP16 ($RAW_BYTES bytes), ${LAYER_MS} ms per layer, modes $MODES, $REPEATS repeat(s) (bound ${TTFT_LIMIT}s)"
  bounded "$TTFT_LIMIT" ip netns exec "$NS_A" "$BIN/skvctl" ttft --sender="$ADDR_A:50551" \
    --receiver="$ADDR_B:50551" --peer=decode --tokens="$TOKENS" --layers="$LAYERS" --kv_heads="$KV_HEADS" \
    --head_dim="$HEAD_DIM" --layer_ms="$LAYER_MS" --modes="$MODES" --repeats="$REPEATS" \
    --timeout_s=$((TTFT_LIMIT > 3600 ? 3600 : TTFT_LIMIT)) --json \
    >"$WORK/skvctl-ttft.out" 2>"$WORK/skvctl-ttft.err"
  TTFT_RC=$?
  [ "$TTFT_RC" -eq 0 ] || die "skvctl ttft failed (exit $TTFT_RC): $(tail -n 3 "$WORK/skvctl-ttft.err")"
  export WORK RATE PERFTEST_MIBPS JSON SMOKE
  "$PY" - <<'EOF' || die "could not assemble the report"
import json, os, sys

env = os.environ
ttft = json.load(open(os.path.join(env["WORK"], "skvctl-ttft.out")))
link = float(env["PERFTEST_MIBPS"]) * 1048576 if env.get("PERFTEST_MIBPS") else None  # bytes/s
layers, layer_s = ttft["layers"], ttft["layer_ms"] / 1000
modes = {m["mode"]: m for m in ttft["modes"]}
for m in ttft["modes"]:
    # One layer's segments on this link, and whether the link keeps up with prefill at all.
    m["layer_wire_s"] = m["wire_bytes"] / layers / link if link else None
    m["link_keeps_up"] = m["layer_wire_s"] is not None and m["layer_wire_s"] <= layer_s
    m["tail_over_layer_wire"] = m["tail_s"] / m["layer_wire_s"] if m["layer_wire_s"] else None
bulk = modes.get("fp16-bulk")
for m in ttft["modes"]:
    m["ttft_over_fp16_bulk"] = m["ttft_s"] / bulk["ttft_s"] if bulk else None
autos = [m for m in ttft["modes"] if m["mode"].startswith("auto") and m["layerwise"]]
for a in autos:
    b = a["mode"][4:].split("-")[0]
    others = [modes[k]["ttft_s"] for k in ("fp16-layerwise", "b%s-layerwise" % b) if k in modes]
    a["over_best_of_fp16_and_codec"] = a["ttft_s"] / min(others) if others else None
out = dict(ttft, rate=env["RATE"], smoke=env["SMOKE"] == "1",
           link_gbps=link * 8 / 1e9 if link else None)
if env["JSON"] == "1":
    print(json.dumps(out, indent=1))
    sys.exit(0)


def f(x, fmt):
    return "n/a" if x is None else fmt % x


print("SpectrumKV TTFT benchmark: tc tbf %s, ucx_perftest %s Gbit/s; %d layers x %d tokens (%d bytes FP16), "
      "prefill %g ms per layer" % (env["RATE"], f(out["link_gbps"], "%.3f"), layers, ttft["tokens"],
                                   ttft["raw_bytes"], ttft["layer_ms"]))
for m in ttft["modes"]:
    print("%-18s TTFT %.3f s = prefill %.3f + tail %.3f | tail / one layer's wire %s%s | vs fp16-bulk %s | "
          "b %.4f%s | signal p50 %.0f us p99 %.0f us" % (
              m["mode"], m["ttft_s"], m["prefill_s"], m["tail_s"], f(m["tail_over_layer_wire"], "%.2f"),
              "" if m["link_keeps_up"] else " (link slower than prefill)", f(m["ttft_over_fp16_bulk"], "%.3f"),
              m["achieved_b"], " FP16 rows" if m["passthrough"] else "", m["signal_p50_us"], m["signal_p99_us"]))
for a in autos:
    print("%s over the better of fp16-layerwise and the codec: %s" % (
        a["mode"], f(a["over_best_of_fp16_and_codec"], "%.3f")))
EOF
  exit 0
fi

# ---- skvctl bench -------------------------------------------------------------------------------
RAW_BYTES=$((LAYERS * 2 * TOKENS * KV_HEADS * HEAD_DIM * 2))
NB=$(echo "$BUDGETS" | tr ',' '\n' | grep -c .)
# Generous bound: each transfer at a tenth of the shaped rate, plus setup.
BENCH_LIMIT=$(awk -v b="$RAW_BYTES" -v r="$RATE_BPS" -v n="$((NB * REPEATS))" \
  'BEGIN { t = 60 + n * (b * 8 / r) * 10; if (t > 1800) t = 1800; printf "%d", t }')
log "skvctl bench: $LAYERS layers x $TOKENS tokens x $KV_HEADS heads x $HEAD_DIM dims FP16 ($RAW_BYTES bytes), budgets $BUDGETS, $REPEATS repeat(s) (bound ${BENCH_LIMIT}s)"
# skvctl's PID is LAST_PID (ip netns exec execs it): its shm objects are removed if it dies early.
bounded "$BENCH_LIMIT" ip netns exec "$NS_A" "$BIN/skvctl" bench --sender="$ADDR_A:50551" \
  --receiver="$ADDR_B:50551" --peer=decode --tokens="$TOKENS" --layers="$LAYERS" --kv_heads="$KV_HEADS" \
  --head_dim="$HEAD_DIM" --budgets="$BUDGETS" --repeats="$REPEATS" --passthrough_mode="$PASSTHROUGH" \
  --timeout_s=$((BENCH_LIMIT > 3600 ? 3600 : BENCH_LIMIT)) --json \
  >"$WORK/skvctl-bench.out" 2>"$WORK/skvctl-bench.err"
BENCH_RC=$?
[ "$BENCH_RC" -eq 0 ] || die "skvctl bench failed (exit $BENCH_RC): $(tail -n 3 "$WORK/skvctl-bench.err")"

# Per-phase durations of every transfer, as both daemons recorded them.
bounded 30 ip netns exec "$NS_A" "$BIN/skvctl" status --target="$ADDR_A:50551" >"$WORK/transfers-sender.json" 2>"$WORK/status.err" \
  || die "skvctl status (sender) failed"
bounded 30 ip netns exec "$NS_A" "$BIN/skvctl" status --target="$ADDR_B:50551" >"$WORK/transfers-receiver.json" 2>>"$WORK/status.err" \
  || die "skvctl status (receiver) failed"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report -------------------------------------------------------------------------------------
export WORK RATE BURST PASSTHROUGH TOKENS LAYERS KV_HEADS HEAD_DIM REPEATS RAW_BYTES PERFTEST_MIBPS PERFTEST_TEST \
  PERFTEST_SIZE PERFTEST_ITERS JSON SMOKE LOAD_BEFORE LOAD_AFTER VETH_A VETH_B
"$PY" - <<'EOF' || die "could not assemble the report"
import json, os, sys

env = os.environ
work = env["WORK"]
bench = json.load(open(os.path.join(work, "skvctl-bench.out")))["transfers"]
raw = int(env["RAW_BYTES"])

def secs(d):
    return float(d[:-1]) if isinstance(d, str) and d.endswith("s") else 0.0

def load_transfers(name):
    try:
        data = json.load(open(os.path.join(work, name)))
    except (OSError, ValueError):
        return []
    return data.get("transfers", [])

# The fastest run of each budget (what skvctl bench reports), with its phases on both sides.
phases = {}
receiver = {t.get("requestId"): t for t in load_transfers("transfers-receiver.json")}
for t in load_transfers("transfers-sender.json"):
    s = t.get("stats", {})
    b = round(float(s.get("requestedBudget", 0)), 6)
    d = {k: secs(v) for k, v in s.get("durations", {}).items()}
    r = receiver.get(t.get("requestId"), {}).get("stats", {}).get("durations", {})
    d["receiver_decode"] = secs(r.get("decode", "0s"))
    d["receiver_wire"] = secs(r.get("wire", "0s"))
    d["receiver_total"] = secs(r.get("total", "0s"))
    d["passthrough"] = bool(s.get("passthrough", {}).get("passthrough", False))
    d["wire_bytes"] = int(s.get("wireBytes", 0))
    if b not in phases or d.get("total", 1e30) < phases[b].get("total", 1e30):
        phases[b] = d

perftest_gbps = None
if env.get("PERFTEST_MIBPS"):
    perftest_gbps = float(env["PERFTEST_MIBPS"]) * 1048576 * 8 / 1e9

def key(b):
    return "ratio_b" + ("%g" % b).replace(".", "")

rows = []
passthrough_s = None
for t in bench:
    if t["budget"] >= 1.0:
        passthrough_s = t["seconds"]
for t in bench:
    b = t["budget"]
    row = dict(t)
    row["gbps_fp16_equivalent"] = raw * 8 / t["seconds"] / 1e9
    row["ratio_to_passthrough"] = (t["seconds"] / passthrough_s) if passthrough_s else None
    row["phases_seconds"] = phases.get(round(b, 6), {})
    rows.append(row)

out = {
    "rate": env["RATE"], "burst": env["BURST"], "smoke": env["SMOKE"] == "1",
    "passthrough_mode": env["PASSTHROUGH"],
    "layers": int(env["LAYERS"]), "tokens": int(env["TOKENS"]), "kv_heads": int(env["KV_HEADS"]),
    "head_dim": int(env["HEAD_DIM"]), "raw_bytes": raw, "repeats": int(env["REPEATS"]),
    "perftest": None if perftest_gbps is None else {
        "test": env["PERFTEST_TEST"], "size": int(env["PERFTEST_SIZE"]), "iterations": int(env["PERFTEST_ITERS"]),
        "mib_per_s": float(env["PERFTEST_MIBPS"])},
    "perftest_gbps": perftest_gbps,
    "passthrough_seconds": passthrough_s,
    "passthrough_gbps": (raw * 8 / passthrough_s / 1e9) if passthrough_s else None,
    "passthrough_fraction": (raw * 8 / passthrough_s / 1e9 / perftest_gbps) if passthrough_s and perftest_gbps else None,
    "transfers": rows,
    "loadavg_before": env["LOAD_BEFORE"], "loadavg_after": env["LOAD_AFTER"], "cpus": os.cpu_count(),
}
for r in rows:
    if r["budget"] < 1.0:
        out[key(r["budget"])] = r["ratio_to_passthrough"]

if env["JSON"] == "1":
    print(json.dumps(out, indent=1, sort_keys=False))
    sys.exit(0)

def f(x, fmt):
    return "n/a" if x is None else fmt % x

print("SpectrumKV transfer benchmark: veth %s <-> %s, tc tbf %s (burst %s) both ways, UCX_TLS=tcp" % (
    env["VETH_A"], env["VETH_B"], env["RATE"], env["BURST"]))
print("KV: %d layers x %d tokens x %d kv heads x %d dims FP16 = %d bytes; fastest of %d run(s); "
      "passthrough mode for b < 1: %s" % (
          out["layers"], out["tokens"], out["kv_heads"], out["head_dim"], raw, out["repeats"],
          env["PASSTHROUGH"]))
if perftest_gbps is not None:
    print("ucx_perftest %s %d B x %d: %.3f Gbit/s (%.1f MiB/s)" % (
        env["PERFTEST_TEST"], out["perftest"]["size"], out["perftest"]["iterations"], perftest_gbps,
        out["perftest"]["mib_per_s"]))
else:
    print("ucx_perftest: not run (--smoke)")
print("FP16 passthrough: %s s, %s Gbit/s = %s of ucx_perftest" % (
    f(passthrough_s, "%.3f"), f(out["passthrough_gbps"], "%.3f"), f(out["passthrough_fraction"], "%.3f")))
for r in rows:
    p = r["phases_seconds"]
    print("b=%-4g achieved %.4f  %.3f s  ratio to passthrough %s  | score %.3f plan %.3f encode %.3f wire %.3f "
          "decode(rx) %.3f total %.3f%s" % (
              r["budget"], r["achieved_b"], r["seconds"], f(r["ratio_to_passthrough"], "%.3f"),
              p.get("score", 0), p.get("plan", 0), p.get("encode", 0), p.get("wire", 0), p.get("decode", 0),
              p.get("total", 0),
              "  [daemon chose FP16 rows]" if r["budget"] < 1 and p.get("passthrough") else ""))
print("every run, in order (the first transfer of a run maps the shared memory afresh): %s" % "; ".join(
    "b=%g %s s" % (r["budget"], ", ".join("%.3f" % x for x in r.get("all_seconds", [r["seconds"]])))
    for r in rows))
print("load average before %s, after %s (%d CPUs)" % (env["LOAD_BEFORE"], env["LOAD_AFTER"], os.cpu_count()))
EOF
