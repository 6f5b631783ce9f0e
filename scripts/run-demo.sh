#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds, and runs the main job: two spectrumkvd daemons on
# loopback (prefill and decode) and disaggregated generation through them (skv-pd-generate): the
# engine prefills a prompt, the prefill daemon Sends its KV at budget 0.5, the decode daemon
# Receives it into the shared memory the decode engine imports, and decoding continues. It prints
# the text, the agreement with non-disaggregated generation and the transfer report. Model: the
# project's stand-in (models/austen-byte-6l-h64.bin), else the shared stories260K. Extra arguments
# go to skv-pd-generate (e.g. --budget=0.3 --tokens=128 --prompt="..."). Then the synthetic
# 7B-shaped transfer (`skvctl demo`: 8 layers x 1024 tokens x 8 KV heads x 128 dims at b = 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup-debian.sh
cmake --preset cpu >/dev/null
cmake --build --preset cpu -j "$(nproc)" --target spectrumkvd skvctl skv-pd-generate

BIN=build/bin
LOGS=$(mktemp -d /tmp/spectrumkv-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

COMMON=(--auth_token=demo-token --ucx_tls=tcp --ucx_net_devices=lo)
"$BIN/spectrumkvd" --daemon_id=decode --grpc_listen_address=127.0.0.1:50561 \
  --data_listen_address=127.0.0.1:50562 --metrics_listen_address=127.0.0.1:9465 \
  --peers=prefill=127.0.0.1:50552 "${COMMON[@]}" >"$LOGS/decode.log" 2>&1 &
PIDS+=($!)
"$BIN/spectrumkvd" --daemon_id=prefill --grpc_listen_address=127.0.0.1:50551 \
  --data_listen_address=127.0.0.1:50552 --metrics_listen_address=127.0.0.1:9464 \
  --peers=decode=127.0.0.1:50562 "${COMMON[@]}" >"$LOGS/prefill.log" 2>&1 &
PIDS+=($!)

"$BIN/skv-pd-generate" --sender=127.0.0.1:50551 --receiver=127.0.0.1:50561 --peer=decode \
  --budget=0.5 "$@"
echo
"$BIN/skvctl" demo --sender=127.0.0.1:50551 --receiver=127.0.0.1:50561 --peer=decode \
  --layers=8 --tokens=1024 --budget=0.5
echo
echo "metrics:  curl -s http://127.0.0.1:9464/metrics (prefill), http://127.0.0.1:9465/metrics (decode)"
# Bytes and tiers are counted by the sender; each side counts its own finished transfers.
curl -s http://127.0.0.1:9464/metrics | grep -E '^spectrumkv_(bytes_total|transfers_total\{result="ok")' || true
curl -s http://127.0.0.1:9465/metrics | grep -E '^spectrumkv_transfers_total\{result="ok"' || true
echo "logs:     $LOGS"
