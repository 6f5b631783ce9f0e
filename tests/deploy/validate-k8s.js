#!/usr/bin/env node
// Validates every object of rendered Kubernetes YAML (kubectl kustomize output) against the
// Kubernetes OpenAPI schemas bundled in kubernetes-models (core, apps, ...) and
// @kubernetes-models/prometheus-operator (PodMonitor, ServiceMonitor, PrometheusRule).
// An object whose apiVersion/kind has no schema is an error, never a silent pass.
// Note: these schemas allow unknown fields, so a misspelt optional field is not caught.
//
// Usage: node validate-k8s.js FILE.yaml...      (exit 0 = all valid)
//        node validate-k8s.js --self-test       (proves invalid objects are rejected)
"use strict";
const fs = require("fs");
const YAML = require("yaml");

function modelClass(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const candidates =
    group === "monitoring.coreos.com"
      ? [`@kubernetes-models/prometheus-operator/${group}/${version}`]
      : [group === "" ? `kubernetes-models/${version}` : `kubernetes-models/${group}/${version}`];
  for (const mod of candidates) {
    let exports;
    try {
      exports = require(mod);
    } catch (e) {
      continue;
    }
    if (typeof exports[kind] === "function") return exports[kind];
  }
  return null;
}

// Returns a list of error strings for one object.
function validateObject(obj) {
  if (!obj || typeof obj !== "object") return ["not an object"];
  if (!obj.apiVersion || !obj.kind) return ["apiVersion and kind are required"];
  const Model = modelClass(obj.apiVersion, obj.kind);
  if (!Model) return [`no schema for ${obj.apiVersion} ${obj.kind}`];
  try {
    new Model(obj).validate();
  } catch (e) {
    return [String(e.message || e)];
  }
  return [];
}

function validateFile(file) {
  const docs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8"));
  const errors = [];
  let count = 0;
  for (const doc of docs) {
    if (doc.errors.length) {
      errors.push(`${file}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      continue;
    }
    const obj = doc.toJS();
    if (obj === null || obj === undefined) continue;
    count++;
    const name = `${obj.kind || "?"}/${(obj.metadata && obj.metadata.name) || "?"}`;
    for (const e of validateObject(obj)) errors.push(`${file}: ${name}: ${e}`);
    if (!errors.length) console.log(`valid  ${file}: ${obj.apiVersion} ${name}`);
  }
  if (count === 0) errors.push(`${file}: no objects`);
  return errors;
}

function selfTest() {
  const ds = (container) => ({
    apiVersion: "apps/v1",
    kind: "DaemonSet",
    metadata: { name: "x" },
    spec: {
      selector: { matchLabels: { a: "b" } },
      template: { metadata: { labels: { a: "b" } }, spec: { containers: [container] } },
    },
  });
  const cases = [
    ["valid DaemonSet", ds({ name: "c", image: "i" }), true],
    ["probe port as a string", ds({ name: "c", livenessProbe: { grpc: { port: "grpc" } } }), false],
    ["container without a name", ds({ image: "i" }), false],
    ["unknown kind", { apiVersion: "v1", kind: "Nonsense", metadata: { name: "x" } }, false],
    ["PodMonitor endpoints not a list",
     { apiVersion: "monitoring.coreos.com/v1", kind: "PodMonitor", metadata: { name: "x" },
       spec: { selector: {}, podMetricsEndpoints: { port: "metrics" } } }, false],
  ];
  let failed = 0;
  for (const [what, obj, shouldPass] of cases) {
    const errors = validateObject(obj);
    const ok = (errors.length === 0) === shouldPass;
    console.log(`${ok ? "ok  " : "FAIL"} self-test: ${what}: ${errors.length ? errors[0] : "valid"}`);
    if (!ok) failed++;
  }
  return failed;
}

const args = process.argv.slice(2);
if (args.length === 0) {
  console.error("usage: validate-k8s.js FILE.yaml... | --self-test");
  process.exit(2);
}
if (args[0] === "--self-test") process.exit(selfTest() ? 1 : 0);
const errors = args.flatMap(validateFile);
for (const e of errors) console.error(`INVALID ${e}`);
process.exit(errors.length ? 1 : 0);
