#!/bin/bash
# ctest python_client_example: two spectrumkvd processes on free loopback ports, then
# client/python/example.py against them with /usr/bin/python3. Both daemons are killed by PID on
# every exit path.
#   run_example.sh SPECTRUMKVD STUBS_DIR [EXAMPLE_PY]
set -u
DAEMON=${1:?usage: run_example.sh SPECTRUMKVD STUBS_DIR [EXAMPLE_PY]}
STUBS=${2:?usage: run_example.sh SPECTRUMKVD STUBS_DIR [EXAMPLE_PY]}
HERE=$(cd "$(dirname "$0")" && pwd)
EXAMPLE=${3:-$HERE/../../client/python/example.py}
PY=/usr/bin/python3

WORK=$(mktemp -d /tmp/skv-pytest.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "---- $f"; tail -n 40 "$f"; }; done
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$DAEMON" ] || { echo "no spectrumkvd at $DAEMON (build the spectrumkvd target)"; exit 1; }
[ -f "$STUBS/spectrumkv/v1/spectrumkv_pb2_grpc.py" ] ||
  { echo "no Python stubs in $STUBS (build the skv_python_stubs target)"; exit 1; }
# Only Debian's interpreter and packages: a missing module is a setup gap, reported as a skip.
[ -x "$PY" ] || { echo "SKIP: no $PY"; exit 77; }
if ! missing=$("$PY" -c 'import grpc, google.protobuf' 2>&1); then
  echo "SKIP: $PY cannot import grpc/protobuf (Debian: python3-grpcio python3-protobuf): $missing"
  exit 77
fi

# Six distinct free loopback ports (bound at once, so they differ, then released).
read -r -a P < <("$PY" - <<'EOF'
import socket
socks = []
for _ in range(6):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
[ "${#P[@]}" -eq 6 ] || { echo "could not pick free ports"; exit 1; }

start() {  # id grpc data metrics peers log
  "$DAEMON" --daemon_id="$1" --grpc_listen_address="127.0.0.1:$2" --data_listen_address="127.0.0.1:$3" \
    --metrics_listen_address="127.0.0.1:$4" --auth_token=python-example-token --ucx_tls=tcp \
    --ucx_net_devices=lo ${5:+--peers=$5} >"$6" 2>&1 &
  PIDS+=($!)
}
start decode "${P[3]}" "${P[4]}" "${P[5]}" "" "$WORK/decode.log"
start prefill "${P[0]}" "${P[1]}" "${P[2]}" "decode=127.0.0.1:${P[4]}" "$WORK/prefill.log"

# Ready when both print their ready line (the example also waits for gRPC health).
ready=0
for _ in $(seq 100); do
  if grep -q "spectrumkvd ready" "$WORK/decode.log" && grep -q "spectrumkvd ready" "$WORK/prefill.log"; then
    ready=1; break
  fi
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "spectrumkvd $pid exited at start"; exit 1; }; done
  sleep 0.1
done
[ "$ready" = 1 ] || { echo "the daemons did not print 'spectrumkvd ready' within 10 s"; exit 1; }

# 10 s start + 40 s example stays under the ctest TIMEOUT of 60 s, so this script's cleanup runs.
# In the background + wait, so a TERM to this script runs the cleanup at once.
SKV_PYTHON_STUBS=$STUBS timeout 40 "$PY" "$EXAMPLE" --sender="127.0.0.1:${P[0]}" \
  --receiver="127.0.0.1:${P[3]}" --peer=decode --budget=0.5 >"$WORK/example.out" 2>&1 &
PIDS+=($!)
wait "${PIDS[-1]}"
rc=$?
cat "$WORK/example.out"
[ "$rc" -eq 0 ] || { echo "example.py exited with $rc"; exit 1; }
for expect in "health sender .*: SERVING" "health receiver .*: SERVING" "registered model" \
    "at b=0.50: committed" "check      received KV identical" "check      passthrough KV identical" \
    "ListTransfers sender" \
    "SENDER +COMMITTED" "RECEIVER +COMMITTED" "code=INVALID_ARGUMENT" "python example: OK"; do
  grep -Eq -- "$expect" "$WORK/example.out" || { echo "expected output missing: $expect"; exit 1; }
done
echo "python_client_example: PASS"
