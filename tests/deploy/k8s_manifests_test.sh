#!/usr/bin/env bash
# Renders deploy/k8s/base and every overlay with `kubectl kustomize`, validates every rendered
# object against the Kubernetes (and Prometheus Operator) schemas, checks the deployment contract
# (check-rendered.js), and loads each rendered ConfigMap into the real daemon.
# Usage: k8s_manifests_test.sh SOURCE_DIR SPECTRUMKVD     Exit 77 (skip) without kubectl/node/tools.
set -euo pipefail
src=$1 daemon=$2
here=$src/tests/deploy
skip() { echo "SKIP: $*"; exit 77; }
command -v kubectl >/dev/null || skip "kubectl not installed (Debian 12: apt-get install kubernetes-client; scripts/setup-debian.sh does)"
command -v node >/dev/null || skip "node not installed (apt-get install nodejs npm)"
[[ -d $here/node_modules/kubernetes-models ]] || skip "npm tools missing: run tests/deploy/install-tools.sh"

tmp=$(mktemp -d /tmp/skv-k8s-test.XXXXXX)
pid=""
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "kubectl: $(kubectl version --client 2>/dev/null | head -1)"
node "$here/validate-k8s.js" --self-test

dirs=("$src/deploy/k8s/base")
for k in "$src"/deploy/k8s/overlays/*/kustomization.yaml; do dirs+=("$(dirname "$k")"); done
[[ ${#dirs[@]} -ge 2 ]] || { echo "FAIL: no overlays under deploy/k8s/overlays"; exit 1; }

for dir in "${dirs[@]}"; do
  name=$(basename "$dir")
  out=$tmp/$name.yaml
  # kustomize's deprecation notices go to stderr; a failure is an error.
  if ! kubectl kustomize "$dir" >"$out" 2>"$tmp/$name.err"; then
    echo "FAIL: kubectl kustomize $dir"; cat "$tmp/$name.err"; exit 1
  fi
  echo "rendered $dir: $(grep -c '^kind:' "$out") objects"
  node "$here/validate-k8s.js" "$out"
  flag=""; [[ $name == rdma ]] && flag=--rdma
  node "$here/check-rendered.js" "$out" "$tmp/$name" $flag

  if command -v promtool >/dev/null; then
    promtool check rules "$tmp/$name/prometheusrule-groups.yml" >/dev/null || { echo "FAIL: PrometheusRule rules"; exit 1; }
    echo "ok   PrometheusRule rules pass promtool check rules"
  fi

  # The daemon must accept the ConfigMap's file as is (listeners moved to free loopback ports).
  log=$tmp/$name.daemon.log
  "$daemon" --config_file="$tmp/$name/spectrumkvd.conf" --grpc_listen_address=127.0.0.1:0 \
    --data_listen_address=127.0.0.1:0 --metrics_listen_address=127.0.0.1:0 \
    --auth_token=config-check --daemon_id=node-1 >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 50); do
    grep -q 'spectrumkvd ready' "$log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if ! grep -q 'spectrumkvd ready' "$log"; then
    echo "FAIL: spectrumkvd did not start with the $name ConfigMap:"; tail -20 "$log"; exit 1
  fi
  kill "$pid"; wait "$pid" || true; pid=""
  echo "ok   spectrumkvd starts with the $name ConfigMap"
done
echo "PASS"
