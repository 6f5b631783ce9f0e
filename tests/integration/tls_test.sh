#!/bin/bash
# ctest grpc_mutual_tls: a spectrumkvd serving gRPC with mutual TLS on a non-loopback-style setup
# (certificates made here with openssl): skvctl with the client certificate is served, skvctl
# without one and skvctl over plaintext are refused. The daemon is killed by PID on every exit.
#   tls_test.sh SPECTRUMKVD SKVCTL
set -u
DAEMON=${1:?usage: tls_test.sh SPECTRUMKVD SKVCTL}
SKVCTL=${2:?usage: tls_test.sh SPECTRUMKVD SKVCTL}
command -v openssl >/dev/null || { echo "SKIP: no openssl"; exit 77; }
WORK=$(mktemp -d /tmp/skv-tls.XXXXXX)
PID=
cleanup() {
  local rc=$?
  if [ -n "$PID" ]; then kill -KILL "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; fi
  [ "$rc" -ne 0 ] && [ -f "$WORK/daemon.log" ] && tail -n 30 "$WORK/daemon.log"
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$WORK" || exit 1
# A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=skv-test-ca" -keyout ca.key -out ca.pem 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -subj "/CN=skv-$who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$who.ext"
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile "$who.ext" \
    -out "$who.pem" 2>/dev/null
done
[ -f server.pem ] && [ -f client.pem ] || { echo "openssl could not make the test certificates"; exit 1; }

read -r G D M < <(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
"$DAEMON" --daemon_id=tls --grpc_listen_address="127.0.0.1:$G" --data_listen_address="127.0.0.1:$D" \
  --metrics_listen_address="127.0.0.1:$M" --auth_token=tls-token --ucx_tls=tcp --ucx_net_devices=lo \
  --tls_cert_file=server.pem --tls_key_file=server.key --tls_ca_file=ca.pem --tls_require_client_cert \
  >daemon.log 2>&1 &
PID=$!
for _ in $(seq 100); do grep -q "spectrumkvd ready" daemon.log && break; sleep 0.1; done
grep -q "spectrumkvd ready" daemon.log || { echo "the daemon did not start"; exit 1; }

fail=0
if ! timeout 20 "$SKVCTL" status --target="127.0.0.1:$G" --tls_ca_file=ca.pem --tls_cert_file=client.pem \
    --tls_key_file=client.key >ok.out 2>&1; then
  echo "FAIL: skvctl with the client certificate was not served:"; cat ok.out; fail=1
fi
if timeout 20 "$SKVCTL" status --target="127.0.0.1:$G" --tls_ca_file=ca.pem >nocert.out 2>&1; then
  echo "FAIL: skvctl without a client certificate was served"; fail=1
fi
if timeout 20 "$SKVCTL" status --target="127.0.0.1:$G" >plain.out 2>&1; then
  echo "FAIL: plaintext skvctl was served"; fail=1
fi
[ "$fail" = 0 ] && echo "grpc_mutual_tls: PASS"
exit "$fail"
