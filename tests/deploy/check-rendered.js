#!/usr/bin/env node
// Checks the deployment contract of rendered manifests (kubectl kustomize output) beyond the
// schema: what the daemon and the inference pod rely on. Writes each ConfigMap's
// spectrumkvd.conf to OUT_DIR so the caller can load it into the real daemon.
//
// Usage: node check-rendered.js RENDERED.yaml OUT_DIR [--rdma]
"use strict";
const fs = require("fs");
const path = require("path");
const YAML = require("yaml");

const [file, outDir, flag] = process.argv.slice(2);
if (!file || !outDir) {
  console.error("usage: check-rendered.js RENDERED.yaml OUT_DIR [--rdma]");
  process.exit(2);
}
const rdma = flag === "--rdma";
const objs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8")).map((d) => d.toJS()).filter(Boolean);
const errors = [];
const expect = (cond, msg) => { if (!cond) errors.push(msg); };
const find = (kind, name) => objs.find((o) => o.kind === kind && o.metadata.name === name);

const ds = find("DaemonSet", "spectrumkvd");
expect(ds, "DaemonSet spectrumkvd missing");
if (ds) {
  const pod = ds.spec.template.spec;
  const c = pod.containers.find((x) => x.name === "spectrumkvd");
  expect(pod.hostIPC === true, "hostIPC must be true (CUDA IPC / shm handles from the inference pod)");
  expect(pod.nodeSelector && pod.nodeSelector["nvidia.com/gpu.present"] === "true", "GPU node selector missing");
  expect((pod.tolerations || []).some((t) => t.key === "nvidia.com/gpu"), "GPU toleration missing");
  expect(pod.securityContext.runAsNonRoot === true, "runAsNonRoot must be true");
  const ports = Object.fromEntries(c.ports.map((p) => [p.name, p.containerPort]));
  expect(ports.grpc === 50551 && ports.data === 50552 && ports.metrics === 9464, `container ports: ${JSON.stringify(ports)}`);
  for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
    expect(c[probe] && c[probe].grpc && c[probe].grpc.port === ports.grpc, `${probe} must be a gRPC health probe on the grpc port`);
  }
  const env = Object.fromEntries((c.env || []).map((e) => [e.name, e]));
  expect(env.NODE_NAME && env.NODE_NAME.valueFrom.fieldRef.fieldPath === "spec.nodeName", "NODE_NAME must come from spec.nodeName");
  expect(env.SKV_DAEMON_ID && env.SKV_DAEMON_ID.value === "$(NODE_NAME)", "SKV_DAEMON_ID must be $(NODE_NAME)");
  expect(c.resources && c.resources.requests && c.resources.limits && c.resources.limits.memory, "resources: requests and a memory limit");
  const sc = c.securityContext;
  expect(sc.allowPrivilegeEscalation === false && sc.readOnlyRootFilesystem === true, "no privilege escalation, read-only root");
  expect(JSON.stringify(sc.capabilities.drop) === '["ALL"]', "capabilities must drop ALL");
  const added = (sc.capabilities.add || []).slice().sort();
  expect(JSON.stringify(added) === (rdma ? '["IPC_LOCK"]' : "[]"), `capabilities added: ${JSON.stringify(added)}`);
  if (rdma) {
    expect(pod.hostNetwork === true, "rdma: hostNetwork");
    expect(Object.keys(c.resources.limits).some((k) => k.startsWith("rdma/")), "rdma: RDMA device resource");
    expect(env.SKV_UCX_TLS && /\btcp\b/.test(env.SKV_UCX_TLS.value), "rdma: UCX_TLS must keep tcp for the listener");
  }
  // Every Service and the PodMonitor point at ports the container declares.
  for (const svc of objs.filter((o) => o.kind === "Service")) {
    for (const p of svc.spec.ports) expect(p.targetPort in ports, `Service ${svc.metadata.name}: targetPort ${p.targetPort} unknown`);
    const sel = svc.spec.selector || {};
    const labels = ds.spec.template.metadata.labels;
    expect(Object.entries(sel).every(([k, v]) => labels[k] === v), `Service ${svc.metadata.name} does not select the pods`);
  }
  expect(find("Service", "spectrumkvd-peers") && find("Service", "spectrumkvd-peers").spec.clusterIP === "None", "peer Service must be headless");
  expect(find("Service", "spectrumkvd-local") && find("Service", "spectrumkvd-local").spec.internalTrafficPolicy === "Local", "local Service must be node-local");
  const pm = objs.find((o) => o.kind === "PodMonitor");
  expect(pm && pm.spec.podMetricsEndpoints.every((e) => e.port in ports), "PodMonitor must scrape a declared port");
  // The ConfigMap mounted as the config file.
  const vol = pod.volumes.find((v) => v.configMap);
  const cm = vol && find("ConfigMap", vol.configMap.name);
  expect(cm && cm.data["spectrumkvd.conf"], "the mounted ConfigMap must have spectrumkvd.conf");
  const mount = c.volumeMounts.find((m) => m.name === vol.name);
  expect(c.args.includes(`--config_file=${mount.mountPath}/spectrumkvd.conf`), "--config_file must name the mounted file");
  if (cm) {
    fs.mkdirSync(outDir, { recursive: true });
    fs.writeFileSync(path.join(outDir, "spectrumkvd.conf"), cm.data["spectrumkvd.conf"]);
  }
}
// The operator's PrometheusRule carries exactly the rules of deploy/prometheus/alerts.yml.
const rule = objs.find((o) => o.kind === "PrometheusRule");
const alertsFile = path.join(__dirname, "..", "..", "deploy", "prometheus", "alerts.yml");
expect(rule, "PrometheusRule missing");
if (rule) {
  const want = YAML.parse(fs.readFileSync(alertsFile, "utf8")).groups;
  // Key order differs after kustomize (it sorts keys); compare canonical forms.
  const canon = (v) => Array.isArray(v) ? v.map(canon) : v && typeof v === "object"
    ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])])) : v;
  expect(JSON.stringify(canon(rule.spec.groups)) === JSON.stringify(canon(want)),
         "PrometheusRule spec.groups differ from deploy/prometheus/alerts.yml");
  fs.mkdirSync(outDir, { recursive: true });
  fs.writeFileSync(path.join(outDir, "prometheusrule-groups.yml"), YAML.stringify({ groups: rule.spec.groups }));
}
for (const e of errors) console.error(`FAIL ${file}: ${e}`);
if (!errors.length) console.log(`ok   ${file}: deployment contract holds${rdma ? " (rdma)" : ""}`);
process.exit(errors.length ? 1 : 0);
