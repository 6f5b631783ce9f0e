#!/usr/bin/python3
"""Dashboard and alert rules against a real Prometheus scraping two real daemons.

Starts two spectrumkvd (prefill -> decode, UCX over TCP on loopback), a Prometheus server (loopback,
temporary storage, scraping both every second, loading deploy/prometheus/alerts.yml), moves KV with
`skvctl bench` (FP16 passthrough and compressed) and `skvctl demo`, makes one Receive time out,
then runs every PromQL expression of deploy/grafana/spectrumkv-dashboard.json and every recording
rule through Prometheus's HTTP API and requires data. Alerts: SpectrumKVTransferErrorRate must be
pending or firing (one of 8 receives failed), the others inactive; after the decode daemon is
stopped, SpectrumKVPeerDown and SpectrumKVDaemonDown must leave `inactive`.

Usage: prometheus_integration_test.py --spectrumkvd=BIN --skvctl=BIN --source-dir=DIR
Exit 77 (ctest skip) when the prometheus binary is missing.
"""
import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

SKIP = 77
DEADLINE_S = 100  # ctest's TIMEOUT is 120 s; fail with a message before it kills us
START = time.monotonic()

# Grafana's macros and this dashboard's variables, as Grafana would expand them with "All".
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$instance": ".*"}


def log(msg):
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def free_ports(n):
    # Bound all at once so they are distinct; a tiny race with other processes remains.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def die_with_parent():
    # Children get SIGKILL if this test is killed (e.g. by ctest's timeout) before cleanup runs.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Processes:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = {}

    def start(self, name, argv):
        out = open(os.path.join(self.tmp, f"{name}.log"), "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=die_with_parent)
        out.close()
        self.procs[name] = p
        log(f"started {name} (pid {p.pid})")
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def check_alive(self):
        for name, p in self.procs.items():
            check(p.poll() is None, f"{name} exited with {p.returncode}:\n{self.tail(name)}")

    def tail(self, name, n=30):
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def prom_api(base, path, **params):
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        body = json.loads(http_get(url))
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    check(body.get("status") == "success",
          f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base, expr):
    return prom_api(base, "query", query=expr)["result"]


def wait_for(what, fn, timeout):
    deadline = min(time.monotonic() + timeout, START + DEADLINE_S)
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (OSError, Failure, ValueError) as e:
            last = e
        time.sleep(0.5)
    raise Failure(f"timed out waiting for {what} (last: {last})")


def dashboard_exprs(dashboard):
    """(panel title, refId, expr) for every target of every panel, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t.get("refId", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def expand(expr):
    for k, v in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(k, v)
    check("$" not in expr, f"unexpanded Grafana variable in: {expr}")
    return expr


def rules_by_name(base):
    rules = {}
    for group in prom_api(base, "rules")["groups"]:
        for r in group["rules"]:
            rules[r["name"]] = r
    return rules


def skvctl(args, binary, *extra, expect_ok=True):
    argv = [binary, *extra]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        out = p.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        # skvctl names its shared memory /skvctl-<pid>-{src,dst}; an interrupted run leaves it.
        for side in ("src", "dst"):
            try:
                os.unlink(f"/dev/shm/skvctl-{p.pid}-{side}")
            except FileNotFoundError:
                pass
    if expect_ok:
        check(p.returncode == 0, f"{' '.join(argv)} failed ({p.returncode}):\n{out}")
    else:
        check(p.returncode != 0, f"{' '.join(argv)} succeeded, a failure was expected:\n{out}")
    return out


def run(args, tmp, procs):
    src = args.source_dir
    with open(os.path.join(src, "deploy/grafana/spectrumkv-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = dashboard_exprs(dashboard)
    check(len(exprs) >= 10, f"dashboard has only {len(exprs)} expressions")

    (p_grpc, p_data, p_metrics, d_grpc, d_data, d_metrics, prom_port) = free_ports(7)
    common = ["--auth_token=integration-token", "--ucx_tls=tcp", "--ucx_net_devices=lo", "--log_level=info"]
    procs.start("decode", [args.spectrumkvd, "--daemon_id=decode",
                           f"--grpc_listen_address=127.0.0.1:{d_grpc}",
                           f"--data_listen_address=127.0.0.1:{d_data}",
                           f"--metrics_listen_address=127.0.0.1:{d_metrics}", *common])
    procs.start("prefill", [args.spectrumkvd, "--daemon_id=prefill",
                            f"--grpc_listen_address=127.0.0.1:{p_grpc}",
                            f"--data_listen_address=127.0.0.1:{p_data}",
                            f"--metrics_listen_address=127.0.0.1:{p_metrics}",
                            f"--peers=decode=127.0.0.1:{d_data}", *common])

    # Prometheus: the shipped rules, both daemons, fast intervals so the test takes seconds.
    shutil.copy(os.path.join(src, "deploy/prometheus/alerts.yml"), os.path.join(tmp, "alerts.yml"))
    with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: spectrumkv
    static_configs:
      - targets: ['127.0.0.1:{p_metrics}']
        labels: {{daemon: prefill}}
      - targets: ['127.0.0.1:{d_metrics}']
        labels: {{daemon: decode}}
""")
    procs.start("prometheus", [args.prometheus, f"--config.file={tmp}/prometheus.yml",
                               f"--storage.tsdb.path={tmp}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}",
                               "--storage.tsdb.retention.time=1h", "--log.level=warn"])
    base = f"http://127.0.0.1:{prom_port}"

    for name, port in (("prefill", p_metrics), ("decode", d_metrics)):
        wait_for(f"{name} /metrics", lambda port=port: b"spectrumkv_transfers_in_flight" in
                 http_get(f"http://127.0.0.1:{port}/metrics"), 20)
    procs.check_alive()
    # Both targets scraped at least once before any traffic, so counters start from recorded zeros
    # and rate() over the window sees the increase.
    wait_for("Prometheus scraping both daemons",
             lambda: len([r for r in query(base, 'up{job="spectrumkv"} == 1')]) == 2, 30)
    log("Prometheus scrapes both daemons")

    sender, receiver = f"127.0.0.1:{p_grpc}", f"127.0.0.1:{d_grpc}"
    shape = ["--layers=4", "--tokens=256"]
    # b=1 is forced FP16 passthrough, 0.5 and 0.3 go through the codec: 6 transfers.
    skvctl(args, args.skvctl, "bench", f"--sender={sender}", f"--receiver={receiver}", "--peer=decode",
           "--budgets=1,0.5,0.3", "--repeats=2", *shape)
    out = skvctl(args, args.skvctl, "demo", f"--sender={sender}", f"--receiver={receiver}", "--peer=decode",
                 "--budget=0.3", *shape)
    check("identical" in out, f"skvctl demo did not verify the transfer:\n{out}")
    # One failure: a Receive nobody sends to (DEADLINE_EXCEEDED on the decode daemon).
    shm_name = f"/skv-deploy-test-{os.getpid()}"
    shm_path = "/dev/shm" + shm_name
    with open(shm_path, "wb") as f:
        f.truncate(4 * 256 * 8 * 128 * 2 * 2)
    try:
        out = skvctl(args, args.skvctl, "receive", f"--target={receiver}", "--model=synthetic-4x8x128-fp16",
                     "--request_id=900001", f"--shm={shm_name}", "--timeout_s=1", *shape, expect_ok=False)
        check("DEADLINE_EXCEEDED" in out, f"receive should time out:\n{out}")
    finally:
        os.unlink(shm_path)
    log("traffic done: 7 transfers and 1 timed-out receive")

    # Wait until Prometheus has the final counts of both daemons.
    wait_for("Prometheus to see all transfers",
             lambda: sum(float(r["value"][1]) for r in query(
                 base, 'sum(spectrumkv_transfers_total{result="ok"})')) >= 14 and
             query(base, 'spectrumkv_transfers_total{result="deadline_exceeded"} > 0'), 20)
    time.sleep(2.5)  # two more rule evaluations on the final data

    # ---- Every dashboard expression returns data.
    values = {}
    for title, ref, expr in exprs:
        result = query(base, expand(expr))
        check(result, f"dashboard panel '{title}' ({ref}) returned no data:\n  {expand(expr)}")
        values[(title, ref)] = result
        log(f"ok  {title} ({ref}): {len(result)} series")
    # Values that must hold after this traffic (catches a dashboard that computes the wrong thing).
    ratio = float(values[("Compression ratio (raw / wire)", "A")][0]["value"][1])
    check(1.2 < ratio < 10, f"compression ratio {ratio}: expected > 1.2 after transfers at b=0.5 and 0.3")
    peers = values[("Peer up", "A")]
    check([(r["metric"].get("peer"), r["value"][1]) for r in peers] == [("decode", "1")], f"peer up: {peers}")
    int4 = values[("INT4 enabled per model", "A")]
    check(any(r["metric"].get("model") == "synthetic-4x8x128-fp16" for r in int4), f"int4 per model: {int4}")
    reasons = {r["metric"].get("reason"): float(r["value"][1]) for r in values[("Passthrough decisions/s by reason", "A")]}
    check(reasons.get("forced", 0) > 0, f"passthrough by reason: {reasons} (bench at b=1 forces passthrough)")
    results = {(r["metric"].get("role"), r["metric"].get("result")): float(r["value"][1])
               for r in values[("Transfers/s by result", "A")]}
    check(results.get(("receiver", "deadline_exceeded"), 0) > 0, "transfers by result: missing the timeout")

    # ---- Template variable query (label_values(metric, label) is Grafana's, not PromQL).
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            definition = var["definition"]
            check(definition.startswith("label_values(") and definition.endswith(")"), definition)
            metric, label = [s.strip() for s in definition[len("label_values("):-1].split(",")]
            got = prom_api(base, f"label/{label}/values", **{"match[]": metric})
            check(len(got) == 2, f"variable {var['name']}: {definition} gave {got}, expected both daemons")

    # ---- Rules: all healthy, recording rules have data, alerts in the expected state.
    rules = rules_by_name(base)
    for name, r in rules.items():
        check(r.get("health") == "ok", f"rule {name}: health {r.get('health')}: {r.get('lastError')}")
    recorded = [n for n, r in rules.items() if r["type"] == "recording"]
    check(len(recorded) >= 3, f"recording rules: {recorded}")
    for name in recorded:
        check(query(base, name), f"recording rule {name} has no data")
        log(f"ok  recording rule {name}")
    error_ratio = query(base, f'spectrumkv:transfer_error_ratio:rate5m{{role="receiver",instance="127.0.0.1:{d_metrics}"}}')
    check(error_ratio and abs(float(error_ratio[0]["value"][1]) - 1 / 8) < 1e-6,
          f"receiver error ratio: {error_ratio}, expected 1/8")
    expected = {"SpectrumKVTransferErrorRate": {"pending", "firing"}, "SpectrumKVPeerDown": {"inactive"},
                "SpectrumKVDaemonDown": {"inactive"}, "SpectrumKVBudgetOvershoot": {"inactive"},
                "SpectrumKVTransferLatencyHigh": {"inactive"}, "SpectrumKVStagingNearFull": {"inactive"}}
    alerts = {n: r for n, r in rules.items() if r["type"] == "alerting"}
    check(set(alerts) == set(expected), f"alert rules {sorted(alerts)} != tested {sorted(expected)}")
    for name, states in expected.items():
        check(alerts[name]["state"] in states, f"alert {name} is {alerts[name]['state']}, expected {states}")
        log(f"ok  alert {name}: {alerts[name]['state']}")

    # ---- Stop the decode daemon: its peer link goes down and Prometheus cannot scrape it.
    procs.stop("decode")
    log("decode daemon stopped")

    def down_alerts():
        a = rules_by_name(base)
        return all(a[n]["state"] in ("pending", "firing") for n in ("SpectrumKVPeerDown", "SpectrumKVDaemonDown"))
    wait_for("SpectrumKVPeerDown and SpectrumKVDaemonDown to become active", down_alerts, 20)
    for n in ("SpectrumKVPeerDown", "SpectrumKVDaemonDown"):
        log(f"ok  alert {n}: {rules_by_name(base)[n]['state']}")
    procs.check_alive()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spectrumkvd", required=True)
    ap.add_argument("--skvctl", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    args = ap.parse_args()
    if not os.access(args.prometheus, os.X_OK):
        print("SKIP: the prometheus binary is not installed (apt-get install prometheus; "
              "scripts/setup-debian.sh does)")
        return SKIP
    for b in (args.spectrumkvd, args.skvctl):
        if not os.access(b, os.X_OK):
            print(f"FAIL: {b} is not built")
            return 1

    # SIGTERM/SIGINT (ctest, Ctrl-C) unwind through the finally below.
    def on_signal(signum, _frame):
        log(f"interrupted by signal {signum}: stopping every process started")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    tmp = tempfile.mkdtemp(prefix="skv-prom-test-")
    procs = Processes(tmp)
    ok = False
    try:
        run(args, tmp, procs)
        ok = True
    except Failure as e:
        print(f"FAIL: {e}")
    except Exception:  # e.g. a timeout or a malformed answer: still clean up, and say what
        import traceback
        print("FAIL: unexpected error\n" + traceback.format_exc())
    finally:
        if not ok:
            for name in ("prefill", "decode", "prometheus"):
                print(f"---- {name} log (last lines)\n{procs.tail(name)}")
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
