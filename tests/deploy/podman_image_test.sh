#!/usr/bin/env bash
# Builds the shipped image (docker/Dockerfile) with Debian 12's podman and runs it:
#   1. podman, runc and debootstrap are installed and podman can start a container here (else SKIP);
#   2. base images: `debootstrap --variant=minbase bookworm` imported as localhost/debian:12 and a
#      slimmed copy (no docs/man/locales, like debian:12-slim) as localhost/debian:12-slim; both
#      are reused when they already exist (no registry is ever pulled from);
#   3. `podman build --format docker` (docker format keeps SHELL and HEALTHCHECK) of
#      docker/Dockerfile from SOURCE_DIR as localhost/spectrumkv:test: the devel stage installs the
#      build packages, the build stage compiles spectrumkvd and skvctl, the runtime stage installs
#      the runtime packages; the image runs as uid 10001 and carries the HEALTHCHECK. The build
#      stage is kept as :test-build-stage (the next run's layer cache); untagged images of earlier
#      runs (only those built on this test's labelled base images) are pruned;
#   4. a decode and a prefill daemon from the image, configured like compose.yaml / tests/demo
#      (SKV_* environment over the image's config file, a shared token file mounted read-only, the
#      prefill names the decode's data address in SKV_PEERS), on host networking with fresh
#      loopback ports and the host's IPC namespace; the image's HEALTHCHECK (`podman healthcheck
#      run`, and skv-health-check by `podman exec`) reports healthy/SERVING and the daemons run as
#      uid 10001;
#   5. the host's skvctl (BUILD_DIR/bin, run as uid 10001 so the daemons can open its 0600
#      shared-memory objects) moves a KV prefill -> decode at b = 0.5 and 1.0 and `skvctl demo`
#      checks the received bytes against the codec's Encode/Decode; /metrics of both daemons count
#      the transfers and the prefill's peer link is up;
#   6. `podman stop` (SIGTERM through tini) stops both daemons with exit 0 within the grace period;
#   7. bench/soak/soak.py with the soak_smoke settings (30 s, concurrency 8, one kill -9 of the
#      decode daemon, garbage connections) with --bin pointing at a wrapper that runs the image's
#      spectrumkvd in a container for each daemon start (see step 7 for what differs from the
#      host soak).
# Every container carries a label of this run and is removed on every exit path; every wait is
# bounded. The podman settings this machine needs (runc, cgroupfs, no default ulimits: the
# container cannot raise RLIMIT_NOFILE here) are in a containers.conf written to the temp dir and
# passed with CONTAINERS_CONF, so /etc/containers is left alone.
# Usage: podman_image_test.sh SOURCE_DIR BUILD_DIR      (as root; BUILD_DIR holds bin/skvctl, python/)
# Environment: SKV_PODMAN_SOAK_SECONDS (30; 0 = no soak), SKV_PODMAN_BUILD_TIMEOUT (2400 s),
# SKV_PODMAN_REBUILD_BASE=1 (debootstrap again even when the base images exist).
set -euo pipefail
src=$(cd "$1" && pwd) built=$(cd "$2" && pwd)
fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }
elapsed() { echo "$((SECONDS - $1)) s"; }

base=localhost/debian:12
slim=localhost/debian:12-slim
image=localhost/spectrumkv:test
soak_seconds=${SKV_PODMAN_SOAK_SECONDS:-30}
build_timeout=${SKV_PODMAN_BUILD_TIMEOUT:-2400}

# ---- 1. Tools and a container that runs.
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[[ ${#missing[@]} -eq 0 ]] || skip "${missing[*]} not installed (scripts/setup-debian.sh installs podman runc debootstrap)"
[[ $(id -u) -eq 0 ]] || skip "needs root: the test runs rootful podman (rootless podman needs subuid ranges and keeps its own image store)"
[[ -x $built/bin/skvctl ]] || fail "$built/bin has no skvctl (build it first)"

tmp=$(mktemp -d /tmp/skv-podman.XXXXXX)
chmod 0755 "$tmp"  # the daemons (uid 10001) read the token file, skvctl runs from here as uid 10001
run_id="skv-podman-test-$$-$RANDOM"
label="skv.podman-test=$run_id"
cat >"$tmp/containers.conf" <<'EOF'
[containers]
# The default ulimits make runc raise RLIMIT_NOFILE, which needs CAP_SYS_RESOURCE.
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$tmp/containers.conf
pm() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }

cleanup() {
  local ids
  ids=$(pm ps -aq --filter "label=$label" 2>/dev/null || true)
  if [[ -n $ids ]]; then
    # shellcheck disable=SC2086
    pm rm -f -t 0 $ids >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The cheapest container there is: /usr/bin/true and its libraries as a --rootfs, no image needed.
probe=$tmp/probe
for f in /usr/bin/true $(ldd /usr/bin/true | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$probe$(dirname "$f")"
  cp -L "$f" "$probe$f"
done
if ! timeout 60 podman --runtime runc --cgroup-manager=cgroupfs run --rm --network host --rootfs "$probe" \
    /usr/bin/true >"$tmp/probe.log" 2>&1; then
  skip "podman cannot run a container here (runc, cgroupfs, host network): $(tr '\n' ' ' <"$tmp/probe.log")"
fi
echo "ok   podman $(podman --version | awk '{print $3}') runs containers here (runc $(runc --version | awk 'NR==1 {print $3}'), cgroupfs, host network)"
# The image build runs apt-get in its stages and debootstrap fetches the base system.
curl -fsS -m 20 -o /dev/null http://deb.debian.org/debian/dists/bookworm/Release ||
  skip "deb.debian.org is not reachable: the base image and the image's apt-get steps need it"

# ---- 2. Base images (cached in podman's store).
t=$SECONDS
# Every image built FROM the base images inherits this label: the clean-up after the build below
# touches nothing else in podman's store.
base_label=org.spectrumkv.podman-test-base
has_label() { [[ $(pm image inspect --format "{{index .Labels \"$base_label\"}}" "$1" 2>/dev/null) == 1 ]]; }
if [[ ${SKV_PODMAN_REBUILD_BASE:-0} != 1 ]] && has_label "$base" && has_label "$slim"; then
  echo "ok   base images $base and $slim already exist (SKV_PODMAN_REBUILD_BASE=1 rebuilds them)"
else
  rootfs=$tmp/rootfs
  timeout 1200 debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$tmp/debootstrap.log" 2>&1 ||
    { tail -20 "$tmp/debootstrap.log"; fail "debootstrap --variant=minbase bookworm failed"; }
  # The apt sources of Debian's official image: bookworm, bookworm-updates, bookworm-security.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["bash"]'
    --change "LABEL $base_label=1")
  tar -C "$rootfs" -c . | pm import -q "${changes[@]}" - "$base" >/dev/null || fail "podman import of $base failed"
  # Slim like debian:12-slim: dpkg leaves out docs, man pages and locales; drop those already there.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  for d in groff info linda lintian/overrides locale man; do
    [[ -d $rootfs/usr/share/$d ]] && find "$rootfs/usr/share/$d" -mindepth 1 -delete
  done
  tar -C "$rootfs" -c . | pm import -q "${changes[@]}" - "$slim" >/dev/null || fail "podman import of $slim failed"
  rm -rf "$rootfs"
  echo "ok   base images $base and $slim from debootstrap --variant=minbase bookworm ($(elapsed "$t"))"
fi
t_base=$((SECONDS - t))
# shellcheck disable=SC2016  # expanded in the container
out=$(pm run --rm --network host "$slim" bash -c '. /etc/os-release; echo "$VERSION_ID $(id -u)"') ||
  fail "cannot run $slim"
[[ $out == "12 0" ]] || fail "$slim is not Debian 12 run as root: $out"

# ---- 3. The image.
t=$SECONDS
build=(podman --runtime runc --cgroup-manager=cgroupfs build --format docker --network host --pull=never --layers
  --ignorefile "$src/docker/Dockerfile.dockerignore"
  --build-arg "DEBIAN_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$slim"
  -f "$src/docker/Dockerfile" -t "$image" "$src")
build_started=$(date +%s)
timeout "$build_timeout" "${build[@]}" >"$tmp/build.log" 2>&1 ||
  { tail -40 "$tmp/build.log"; fail "podman build of docker/Dockerfile failed (or ran past ${build_timeout} s)"; }
t_build=$((SECONDS - t))
# Each source change leaves the previous image and its ~1.2 GB build stage behind, untagged. Tag
# this build's build stage (all cached: seconds) so that it stays as the next run's cache, then
# remove the untagged images from earlier runs.
timeout 600 "${build[@]:0:${#build[@]}-3}" --target build -t "$image-build-stage" "$src" >"$tmp/build-stage.log" 2>&1 ||
  { tail -20 "$tmp/build-stage.log"; fail "tagging the build stage (podman build --target build) failed"; }
pm image prune -f --filter "label=$base_label=1" --filter "until=$build_started" >/dev/null 2>&1 ||
  echo "note: podman image prune of the earlier test images failed"
size=$(pm image inspect --format '{{.Size}}' "$image")
echo "ok   podman build --format docker: $image, $((size / 1000000)) MB ($(elapsed "$t"))"
user=$(pm image inspect --format '{{.Config.User}}' "$image")
[[ $user == 10001:10001 ]] || fail "the image's USER is '$user', not 10001:10001"
health=$(pm image inspect --format '{{json .HealthCheck}}' "$image")
grep -q 'skv-health-check' <<<"$health" || fail "the image has no HEALTHCHECK running skv-health-check (docker format lost?): $health"
ids=$(pm run --rm --network none --no-healthcheck --entrypoint /usr/bin/id "$image" -u 2>"$tmp/id.err") ||
  fail "cannot run the image: $(cat "$tmp/id.err")"
[[ $ids == 10001 ]] || fail "the image runs as uid '$ids', not 10001"
pm run --rm --network none --no-healthcheck "$image" --help >"$tmp/help.txt" 2>&1 || true
grep -q -- '--daemon_id' "$tmp/help.txt" || { head -20 "$tmp/help.txt"; fail "spectrumkvd --help in the image does not list its flags"; }
health_cmd=${health#*\"Test\":[}
echo "ok   image runs as uid 10001, HEALTHCHECK [${health_cmd%%]*}], spectrumkvd starts"

# ---- 4. A decode and a prefill daemon from the image.
t=$SECONDS
read -r d_grpc d_data d_metrics p_grpc p_data p_metrics < <(/usr/bin/python3 -c '
import socket; s=[socket.socket() for _ in range(6)]
[x.bind(("127.0.0.1",0)) for x in s]; print(*[x.getsockname()[1] for x in s])')
echo "podman-image-test-token-$RANDOM$RANDOM" >"$tmp/token"
chmod 0644 "$tmp/token"
# podman runs the HEALTHCHECK's interval from systemd timers; without systemd as PID 1 (this VM)
# it logs "unable to get systemd connection" on run/stop/rm (kept in $tmp/podman.err) and the test
# runs the check itself: `podman healthcheck run` uses the image's command and updates the
# container's health status the same way.
start_daemon() {  # NAME GRPC DATA METRICS [PEERS]
  local env=(-e "SKV_DAEMON_ID=$1" -e "SKV_GRPC_LISTEN_ADDRESS=127.0.0.1:$2" -e "SKV_DATA_LISTEN_ADDRESS=127.0.0.1:$3"
    -e "SKV_METRICS_LISTEN_ADDRESS=127.0.0.1:$4" -e SKV_AUTH_TOKEN_FILE=/run/secrets/skv-auth-token
    -e SKV_UCX_NET_DEVICES=lo -e "SKV_HEALTH_TARGET=127.0.0.1:$2")
  [[ -z ${5:-} ]] || env+=(-e "SKV_PEERS=$5")
  pm run -d --name "$run_id-$1" --label "$label" --network host --ipc host --stop-timeout 30 \
    -v "$tmp/token:/run/secrets/skv-auth-token:ro" "${env[@]}" "$image" >/dev/null 2>>"$tmp/podman.err" ||
    fail "podman run of the $1 daemon failed: $(tail -3 "$tmp/podman.err")"
}
wait_healthy() {  # NAME: the image's HEALTHCHECK, bounded (the image gives it 10 s + 3 x 10 s)
  local c=$run_id-$1 i
  for i in $(seq 60); do
    if pm healthcheck run "$c" >"$tmp/hc.out" 2>&1; then break; fi
    [[ $(pm inspect --format '{{.State.Running}}' "$c") == true ]] ||
      { pm logs "$c" | tail -20; fail "the $1 container exited: $(pm inspect --format '{{.State.ExitCode}}' "$c")"; }
    [[ $i -lt 60 ]] || { pm logs "$c" | tail -20; cat "$tmp/hc.out"; fail "the $1 container's HEALTHCHECK did not pass within 30 s"; }
    sleep 0.5
  done
  local status
  status=$(pm inspect --format '{{.State.Health.Status}}' "$c")
  [[ $status == healthy ]] || fail "the $1 container's health is '$status' after a passing check"
  pm exec "$c" /opt/spectrumkv/bin/skv-health-check --timeout=3 >"$tmp/hc-exec.out" 2>&1 ||
    fail "skv-health-check in the $1 container: $(cat "$tmp/hc-exec.out")"
  grep -q SERVING "$tmp/hc-exec.out" || fail "unexpected health output: $(cat "$tmp/hc-exec.out")"
  # tini is the container's PID 1, spectrumkvd its child; both as uid 10001 (no user namespace).
  local pid1 uids
  pid1=$(pm inspect --format '{{.State.Pid}}' "$c")
  uids=$( (ps -o uid=,comm= -p "$pid1"; ps -o uid=,comm= --ppid "$pid1") | awk '{print $1 ":" $2}' | paste -sd' ')
  [[ $uids == "10001:tini 10001:spectrumkvd" ]] || fail "the $1 container's processes are not tini + spectrumkvd as uid 10001: $uids"
  echo "ok   $1: healthy ($(cat "$tmp/hc-exec.out")), processes $uids"
}
start_daemon decode "$d_grpc" "$d_data" "$d_metrics"
wait_healthy decode
start_daemon prefill "$p_grpc" "$p_data" "$p_metrics" "decode=127.0.0.1:$d_data"
wait_healthy prefill

# ---- 5. Move a KV with the host's skvctl, as uid 10001: its shared-memory objects are created
# 0600 by their owner, the daemons (same uid, host IPC namespace) map them.
install -m 0755 "$built/bin/skvctl" "$tmp/skvctl"
request_id=0
for budget in 0.5 1; do
  request_id=$((request_id + 1))
  timeout 120 setpriv --reuid=10001 --regid=10001 --clear-groups "$tmp/skvctl" demo \
    --sender="127.0.0.1:$p_grpc" --receiver="127.0.0.1:$d_grpc" --peer=decode \
    --layers=4 --kv_heads=4 --head_dim=64 --tokens=512 --budget="$budget" --request_id="$request_id" \
    >"$tmp/demo.out" 2>&1 || { cat "$tmp/demo.out"; pm logs "$run_id-decode" | tail -20; fail "skvctl demo at b=$budget failed"; }
  grep -q "result     identical to the codec's Encode/Decode" "$tmp/demo.out" ||
    { cat "$tmp/demo.out"; fail "skvctl demo at b=$budget: the received KV is not what the codec produces"; }
  echo "ok   KV moved prefill -> decode at b=$budget, received bytes identical to Encode/Decode:$(grep -E '^  (budget|bytes) ' "$tmp/demo.out" | tr -s ' ' | tr '\n' ';')"
done
metric() {  # PORT REGEX: sum of the matching samples of /metrics
  curl -fsS -m 5 "http://127.0.0.1:$1/metrics" | { grep -E "$2" || true; } | awk '{s += $NF} END {print s + 0}'
}
got=$(metric "$d_metrics" '^spectrumkv_transfers_total\{.*role="receiver".*result="ok"|^spectrumkv_transfers_total\{.*result="ok".*role="receiver"')
sent=$(metric "$p_metrics" '^spectrumkv_transfers_total\{.*role="sender".*result="ok"|^spectrumkv_transfers_total\{.*result="ok".*role="sender"')
up=$(metric "$p_metrics" '^spectrumkv_peer_up\{peer="decode"\}')
[[ $got == 2 && $sent == 2 ]] || fail "/metrics count $sent sent and $got received transfers, expected 2 and 2"
[[ $up == 1 ]] || fail "the prefill's spectrumkv_peer_up{peer=\"decode\"} is $up"
echo "ok   /metrics: 2 transfers ok on each side, prefill's peer link to decode up"

# ---- 6. SIGTERM through tini: exit 0 within the grace.
stop_daemon() {
  local c=$run_id-$1 started rc secs
  started=$SECONDS
  timeout 60 podman --runtime runc --cgroup-manager=cgroupfs stop -t 30 "$c" >/dev/null 2>>"$tmp/podman.err" ||
    fail "podman stop of the $1 container failed: $(tail -3 "$tmp/podman.err")"
  secs=$((SECONDS - started))
  rc=$(pm inspect --format '{{.State.ExitCode}}' "$c")
  [[ $rc == 0 ]] || { pm logs "$c" | tail -20; fail "the $1 daemon exited with $rc after SIGTERM (137 = killed after the 30 s grace)"; }
  pm logs "$c" >"$tmp/$1.log" 2>&1 || true
  grep -q 'signal 15: shutting down' "$tmp/$1.log" || { tail -5 "$tmp/$1.log"; fail "the $1 daemon's log has no SIGTERM shutdown line"; }
  ! grep -E '\] \[(error|critical)\] ' "$tmp/$1.log" || fail "the $1 daemon logged errors"
  echo "ok   podman stop: $1 exited 0 in ${secs} s (grace 30 s)"
}
stop_daemon prefill
stop_daemon decode
t_pair=$((SECONDS - t))
pm rm "$run_id-prefill" "$run_id-decode" >/dev/null 2>>"$tmp/podman.err"

# ---- 7. The soak smoke against the image's daemon.
t_soak=0
if [[ $soak_seconds == 0 ]]; then
  echo "note: SKV_PODMAN_SOAK_SECONDS=0: no soak against the image"
else
  t=$SECONDS
  # soak.py starts `--bin` with its own flags (ports, peers, token, --ucx_net_devices=lo), restarts
  # it after a kill -9 and SIGTERMs it at the end. The wrapper runs the image's spectrumkvd in a
  # new container for each start (host network and IPC). What differs from the host soak:
  #  - the driver (root) creates its shared-memory objects 0600: the daemon, still uid 10001, gets
  #    CAP_DAC_OVERRIDE to open them;
  #  - soak.py's kill -9 hits the wrapper, which leaves its `podman run` client and container running;
  #    the restart's wrapper (started a few ms later) sends SIGKILL to the previous life's
  #    spectrumkvd (its host pid, recorded when it started), so tini and the container exit too;
  #  - the RSS/fd/thread samples are the wrapper's, not the daemon's.
  # SIGTERM reaches the daemon through `podman kill --signal TERM` and tini, as with `podman stop`.
  mkdir -p "$tmp/soak-bin" "$tmp/soak"
  cat >"$tmp/soak-bin/spectrumkvd" <<'EOF'
#!/usr/bin/env bash
# spectrumkvd for soak.py: the image's daemon in a container. SKV_SOAK_* come from the test.
set -euo pipefail
pm() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
id=daemon
for a in "$@"; do case $a in --daemon_id=*) id=${a#--daemon_id=} ;; esac; done
log=$SKV_SOAK_DIR/wrapper.log pidfile=$SKV_SOAK_DIR/$id.pid
if [[ -s $pidfile ]]; then  # a restart: the previous life survived the kill of its podman client
  read -r dpid <"$pidfile"
  rm -f "$pidfile"
  if [[ $(ps -o comm= -p "$dpid" 2>/dev/null || true) == spectrumkvd ]] && kill -KILL "$dpid" 2>/dev/null; then
    echo "$(date +%T.%N) kill -9 $id pid $dpid" >>"$log"
  fi
fi
old=$(pm ps -q --filter "label=$SKV_SOAK_LABEL" --filter "label=skv.soak-role=$id")
if [[ -n $old ]]; then  # its container, still exiting (or a failed start's, still being removed)
  # shellcheck disable=SC2086
  pm rm -f -t 0 $old >/dev/null 2>&1 || true
fi
name=$SKV_SOAK_RUN_ID-soak-$id-$$
(  # record the daemon's host pid (tini's child) for the next restart; bounded
  for _ in $(seq 200); do
    p=$(pm inspect --format '{{.State.Pid}}' "$name" 2>/dev/null || true)
    if [[ -n $p && $p != 0 ]]; then
      c=$(ps -o pid=,comm= --ppid "$p" | awk '$2 == "spectrumkvd" {print $1}')
      if [[ -n $c ]]; then echo "$c" >"$pidfile"; echo "$(date +%T.%N) $id pid $c" >>"$log"; exit 0; fi
    fi
    sleep 0.1
  done
) </dev/null >/dev/null 2>&1 &
# podman's own signal proxy is off: podman 4.3 re-raises a proxied SIGTERM on itself when its
# forward races the container's exit, so soak.py saw "-15" from a daemon that stopped cleanly.
# The wrapper forwards SIGTERM itself and exits with the container's status.
pm run --sig-proxy=false --rm --name "$name" --label "$SKV_SOAK_LABEL" \
  --label "skv.soak-role=$id" --network host --ipc host --cap-add DAC_OVERRIDE --no-healthcheck \
  --stop-timeout 10 "$SKV_SOAK_IMAGE" "$@" &
client=$!
trap 'pm kill --signal TERM "$name" >/dev/null 2>&1 || true' TERM INT
while :; do
  rc=0
  wait "$client" || rc=$?
  kill -0 "$client" 2>/dev/null || exit "$rc"  # else a trapped signal interrupted the wait
done
EOF
  chmod 0755 "$tmp/soak-bin/spectrumkvd"
  soak_rc=0
  SKV_SOAK_DIR=$tmp/soak SKV_SOAK_LABEL=$label SKV_SOAK_RUN_ID=$run_id SKV_SOAK_IMAGE=$image \
    timeout $((soak_seconds + 300)) /usr/bin/python3 "$src/bench/soak/soak.py" --bin "$tmp/soak-bin/spectrumkvd" \
    --stubs "$built/python" --duration "$soak_seconds" --concurrency 8 --kill-every 15 --garbage-rate 5 \
    --receive-timeout 20 --send-deadline 45 --restart-timeout 70 --seed 1 --log-dir "$tmp/soak" \
    >"$tmp/soak.out" 2>"$tmp/soak.err" || soak_rc=$?
  t_soak=$((SECONDS - t))
  case $soak_rc in
    0) summary=$(/usr/bin/python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
print("%d transfers: %d ok, %d failed, %d cancelled, lost %d, corrupt %d, half-committed %d (+%d explained by the kill); "
      "kills %d, restart %.1f s; shutdown %s" % (s["transfers"], s["ok"], s["failed"], s["cancelled"], s["lost"],
      s["corrupt"], s["half_committed"], s["half_committed_explained_by_kill"], s["kills"], s["restart_s"]["max"] or 0,
      ", ".join("%s exit %s" % (k, v["exit"]) for k, v in sorted(s["shutdown"].items()))))
print(s["kills"])' "$tmp/soak/summary.json") || fail "no readable summary.json from soak.py"
       kills=$(tail -1 <<<"$summary")
       killed=$(grep -c "kill -9 decode" "$tmp/soak/wrapper.log" 2>/dev/null || true)
       # soak.py kills decode every 15 s, not in the last second of the run.
       if [[ $soak_seconds -gt 16 ]]; then
         [[ $kills -ge 1 ]] || fail "soak.py reported no kill of the decode daemon"
         [[ ${killed:-0} == "$kills" ]] ||
           fail "soak.py killed decode $kills times but the wrapper killed ${killed:-0} decode daemons in their containers"
       fi
       echo "ok   soak.py ${soak_seconds} s against the image's daemon ($(elapsed "$t")): $(head -1 <<<"$summary")" ;;
    77) echo "note: soak skipped: $(cat "$tmp/soak.out")" ;;
    *) cat "$tmp/soak.out"; tail -30 "$tmp/soak.err"
       for f in "$tmp"/soak/*.log; do echo "--- $f"; tail -15 "$f"; done
       fail "soak.py against the image's daemon exited with $soak_rc" ;;
  esac
  left=$(pm ps -aq --filter "label=$label")
  [[ -z $left ]] || fail "containers of the soak still exist after it ended: $left"
fi

echo "phases: base image ${t_base} s, image build ${t_build} s, daemon pair ${t_pair} s, soak ${t_soak} s; image $((size / 1000000)) MB"
echo "PASS"
