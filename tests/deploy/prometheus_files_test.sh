#!/usr/bin/env bash
# promtool on the shipped Prometheus files: the Kubernetes scrape config, the compose demo's
# config (with the rules next to it, as compose mounts them), the alert rules, and the alert
# rules' unit tests (deploy/prometheus/alerts_test.yml). Also checks that the Grafana dashboard is
# well-formed JSON with unique panel ids and every query on the dashboard's data source variable.
# Usage: prometheus_files_test.sh SOURCE_DIR      Exit 77 (skip) without promtool.
set -euo pipefail
src=$1
command -v promtool >/dev/null || { echo "SKIP: promtool not installed (apt-get install prometheus; scripts/setup-debian.sh does)"; exit 77; }
tmp=$(mktemp -d /tmp/skv-promtool.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

promtool check config "$src/deploy/prometheus/prometheus.yml"
promtool check rules "$src/deploy/prometheus/alerts.yml"
(cd "$src/deploy/prometheus" && promtool test rules alerts_test.yml)
cp "$src/docker/prometheus/prometheus.yml" "$src/deploy/prometheus/alerts.yml" "$tmp/"
promtool check config "$tmp/prometheus.yml"

/usr/bin/python3 - "$src/deploy/grafana/spectrumkv-dashboard.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
panels = []
def walk(ps):
    for p in ps:
        panels.append(p)
        walk(p.get("panels", []))
walk(d["panels"])
ids = [p["id"] for p in panels]
assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
names = {v["name"] for v in d["templating"]["list"]}
assert {"datasource", "instance"} <= names, names
n = 0
for p in panels:
    for t in p.get("targets", []):
        assert t.get("datasource", {}).get("uid") == "${datasource}", f"{p['title']}: query not on ${{datasource}}"
        assert "$instance" in t["expr"], f"{p['title']}: query ignores the instance selector"
        n += 1
assert d["uid"] == "spectrumkv" and n >= 10
print(f"ok   dashboard: {len(panels)} panels, {n} queries")
PY
echo PASS
