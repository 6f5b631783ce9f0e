#!/usr/bin/python3
"""Tables and a plot from `run_transfer_bench.sh --ttft --json` runs at several link rates.

Usage: ttft_report.py --out docs/results/ttft RUN.json [RUN.json ...]
Writes OUT.md (a table per rate and the issue's targets, measured) and OUT.png (TTFT per mode and
rate; skipped with a note when matplotlib is missing).
"""
import argparse
import json
import sys


def load(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    runs.sort(key=lambda r: r.get("link_gbps") or 0)
    return runs


def fmt(x, f):
    return "n/a" if x is None else f % x


def targets(run):
    """The issue's three targets on one run: (text, met) pairs."""
    out = []
    modes = {m["mode"]: m for m in run["modes"]}
    for m in run["modes"]:
        if m["layerwise"] and m["link_keeps_up"]:
            ratio = m["tail_over_layer_wire"]
            out.append(("%s: tail %.1f ms <= 1.5 x one layer's wire (%.1f ms): %.2f" % (
                m["mode"], m["tail_s"] * 1e3, m["layer_wire_s"] * 1e3, ratio), ratio <= 1.5))
    if run["rate"] == "1gbit" and "b0.5-layerwise" in modes and "fp16-bulk" in modes:
        r = modes["b0.5-layerwise"]["ttft_over_fp16_bulk"]
        out.append(("b0.5-layerwise TTFT <= 0.55 x fp16-bulk: %.3f" % r, r <= 0.55))
    for m in run["modes"]:
        if m.get("over_best_of_fp16_and_codec") is not None:
            r = m["over_best_of_fp16_and_codec"]
            out.append(("%s within 5%% of the better of fp16-layerwise and the codec: %.3f" % (
                m["mode"], r), r <= 1.05))
    return out


def markdown(runs):
    lines = []
    for run in runs:
        lines.append("### %s (ucx_perftest %s Gbit/s)" % (run["rate"], fmt(run.get("link_gbps"), "%.3f")))
        lines.append("")
        lines.append("| mode | TTFT s | prefill s | tail s | tail / one layer's wire | vs fp16-bulk | achieved b | "
                     "signal p50 / p99 us | runs (TTFT s) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m in run["modes"]:
            keeps = "" if m["link_keeps_up"] else " (link slower than prefill)"
            lines.append("| %s | %.3f | %.3f | %.3f | %s%s | %s | %.4f%s | %.0f / %.0f | %s |" % (
                m["mode"], m["ttft_s"], m["prefill_s"], m["tail_s"], fmt(m["tail_over_layer_wire"], "%.2f"),
                keeps, fmt(m["ttft_over_fp16_bulk"], "%.3f"), m["achieved_b"],
                " (FP16 rows)" if m["passthrough"] else "", m["signal_p50_us"], m["signal_p99_us"],
                ", ".join("%.3f" % t for t in m["all_ttft_s"])))
        lines.append("")
        t = targets(run)
        if t:
            lines.append("Targets: " + "; ".join("%s (%s)" % (text, "met" if ok else "**missed**") for text, ok in t))
            lines.append("")
    return "\n".join(lines)


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (Debian: python3-matplotlib): no plot"
    names = [m["mode"] for m in runs[0]["modes"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, run in enumerate(runs):
            m = next((m for m in run["modes"] if m["mode"] == name), None)
            if m is not None:
                xs.append(j + i * width)
                ys.append(m["ttft_s"])
        ax.bar(xs, ys, width, label=name)
    prefill = runs[0]["modes"][0]["prefill_s"]
    ax.axhline(prefill, color="black", linewidth=0.8, linestyle="--", label="prefill alone")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))])
    ax.set_xticklabels(["%s\n(%s Gbit/s measured)" % (r["rate"], fmt(r.get("link_gbps"), "%.2f")) for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("prefill start -> KV committed on the decode side (s)")
    ax.set_title("TTFT's transfer share: %d layers x %d tokens, %g ms per prefill layer" % (
        runs[0]["layers"], runs[0]["tokens"], runs[0]["layer_ms"]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    runs = load(args.runs)
    with open(args.out + ".tables.md", "w") as f:
        f.write(markdown(runs) + "\n")
    note = plot(runs, args.out + ".png")
    if note:
        print(note, file=sys.stderr)
    print(markdown(runs))


if __name__ == "__main__":
    main()
