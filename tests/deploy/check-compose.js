#!/usr/bin/env node
// Cross-checks docker/compose.yaml without a Docker engine: every file it mounts exists, service
// references resolve, and the daemons' ports, peers, scrape targets and Grafana paths agree with
// docker/spectrumkvd.conf, docker/prometheus/prometheus.yml and the Grafana provisioning.
// Usage: node check-compose.js SOURCE_DIR
"use strict";
const fs = require("fs");
const path = require("path");
const YAML = require("yaml");

const src = path.resolve(process.argv[2] || ".");
const dockerDir = path.join(src, "docker");
const read = (p) => YAML.parse(fs.readFileSync(p, "utf8"));
const compose = read(path.join(dockerDir, "compose.yaml"));
const errors = [];
const expect = (cond, msg) => { if (!cond) errors.push(msg); };

const conf = Object.fromEntries(fs.readFileSync(path.join(dockerDir, "spectrumkvd.conf"), "utf8")
  .split("\n").filter((l) => l.includes("=") && !l.trim().startsWith("#"))
  .map((l) => l.split("=").map((x) => x.trim())));
const port = (addr) => addr.split(":").pop();

const services = compose.services || {};
for (const name of ["decode", "prefill", "traffic", "prometheus", "grafana"]) expect(services[name], `service ${name} missing`);
for (const [name, svc] of Object.entries(services)) {
  for (const v of svc.volumes || []) {
    const host = String(v).split(":")[0];
    if (host.startsWith(".")) expect(fs.existsSync(path.join(dockerDir, host)), `${name}: mounts missing ${host}`);
  }
  if (typeof svc.ipc === "string" && svc.ipc.startsWith("service:")) {
    const target = services[svc.ipc.slice(8)];
    expect(target && target.ipc === "shareable", `${name}: ipc ${svc.ipc} needs that service's ipc: shareable`);
  }
  for (const dep of Object.keys(svc.depends_on || {}).concat(Array.isArray(svc.depends_on) ? svc.depends_on : [])) {
    if (isNaN(Number(dep))) expect(services[dep], `${name}: depends_on unknown service ${dep}`);
  }
  for (const s of svc.secrets || []) expect(compose.secrets && compose.secrets[s], `${name}: unknown secret ${s}`);
}
for (const [name, s] of Object.entries(compose.secrets || {})) {
  expect(fs.existsSync(path.join(dockerDir, s.file)), `secret ${name}: ${s.file} missing`);
}
const build = services.decode && services.decode.build;
expect(build && fs.existsSync(path.join(dockerDir, build.context, build.dockerfile)), "decode: build context/dockerfile missing");

// Peers and scrape targets agree with the image's config.
const env = (services.prefill && services.prefill.environment) || {};
expect(env.SKV_PEERS === `decode=decode:${port(conf.data_listen_address)}`, `prefill SKV_PEERS ${env.SKV_PEERS} vs data port ${conf.data_listen_address}`);
const prom = read(path.join(dockerDir, "prometheus", "prometheus.yml"));
const targets = prom.scrape_configs.flatMap((s) => (s.static_configs || []).flatMap((c) => c.targets));
expect(JSON.stringify(targets.sort()) === JSON.stringify([`decode:${port(conf.metrics_listen_address)}`, `prefill:${port(conf.metrics_listen_address)}`]),
       `scrape targets ${targets} vs metrics port ${conf.metrics_listen_address}`);
const traffic = JSON.stringify(services.traffic && services.traffic.command);
expect(traffic.includes(`prefill:${port(conf.grpc_listen_address)}`) && traffic.includes(`decode:${port(conf.grpc_listen_address)}`),
       "traffic must address both daemons' gRPC port");

// Grafana: provisioned dashboard directory is where compose mounts deploy/grafana.
const provider = read(path.join(dockerDir, "grafana/provisioning/dashboards/spectrumkv.yml")).providers[0];
const mounts = (services.grafana.volumes || []).map((v) => String(v).split(":"));
const dash = mounts.find(([, target]) => target === provider.options.path);
expect(dash && path.resolve(dockerDir, dash[0]) === path.join(src, "deploy", "grafana"), "Grafana provider path is not the deploy/grafana mount");
const home = services.grafana.environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH;
expect(home && dash && fs.existsSync(path.join(src, "deploy", "grafana", path.relative(provider.options.path, home))), `home dashboard ${home} missing`);
const ds = read(path.join(dockerDir, "grafana/provisioning/datasources/prometheus.yml")).datasources[0];
expect(ds.type === "prometheus" && ds.url === "http://prometheus:9090", `datasource ${ds.url}`);

for (const e of errors) console.error(`FAIL compose: ${e}`);
if (!errors.length) console.log(`ok   docker/compose.yaml: ${Object.keys(services).length} services, files and ports consistent`);
process.exit(errors.length ? 1 : 0);
