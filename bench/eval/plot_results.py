#!/usr/bin/python3
"""Plots skv-eval's JSON: quality vs achieved budget b, one line per method.

Usage: plot_results.py RESULTS.json OUT.png
Panels: PPL change % (symlog), mean KL, top-1 agreement, and passkey success when present.
Fixed-rate methods (fp16, int8, int4, ...) are single markers.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        data = json.load(f)
    rows = [r for r in data["results"] if r.get("achieved_b") is not None]
    panels = [("ppl_change_pct", "PPL change vs FP16 KV (%)"), ("kl", "mean KL (nats)"),
              ("top1", "top-1 agreement")]
    if any(r.get("passkey") is not None for r in rows):
        panels.append(("passkey", "passkey success"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    cmap = plt.get_cmap("tab20")
    for ax, (key, label) in zip(axes, panels):
        for i, m in enumerate(methods):
            pts = sorted((r["achieved_b"], r[key]) for r in rows
                         if r["method"] == m and r.get(key) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "o" if len(pts) == 1 else "o-"
            ax.plot(xs, ys, style, label=m, color=cmap(i % 20), markersize=4, linewidth=1.2)
        ax.set_xlabel("achieved b (all wire bytes / FP16 bytes)")
        ax.set_ylabel(label)
        values = [r[key] for r in rows if r.get(key) is not None]
        if key == "ppl_change_pct" and values and max(abs(v) for v in values) > 2.0:
            ax.set_yscale("symlog", linthresh=0.5)  # small changes linear, collapses logarithmic
        if key == "kl":
            positive = [v for v in values if v > 0]
            if positive:  # linear below the smallest nonzero KL, logarithmic above
                ax.set_yscale("symlog", linthresh=min(positive))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{data['model']} on {data['text']} "
                 f"(C={data.get('context')}, L={data.get('continuation')}, "
                 f"{data.get('windows')} windows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
