#!/usr/bin/python3
"""Plots skv-eval's JSON: quality vs achieved budget b, one line per method.

Usage: plot_results.py RESULTS.json OUT.png
Panels: PPL change % (symlog), mean KL, top-1 agreement, passkey success when present, and the
tasks' accuracy (copy: token accuracy; recall) when present, with the question inside the prefill
(solid) and outside it (dashed; passkey too). Fixed-rate methods (fp16, int8, ...) are markers.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


QUESTIONS = ("inside", "outside")


def task_value(row, task, question):
    """A task's accuracy for one placement of its question, or None when it did not run."""
    cell = ((row.get("tasks") or {}).get(task) or {}).get(question)
    return None if cell is None else cell.get("accuracy")


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
    for task, label in (("copy", "copy: token accuracy"), ("recall", "recall success")):
        if any(task_value(r, task, q) is not None for r in rows for q in QUESTIONS):
            panels.append((task, label))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    cmap = plt.get_cmap("tab20")
    for ax, (key, label) in zip(axes, panels):
        # (value of a row, line style): the key itself; for the tasks, inside then outside.
        if key in ("copy", "recall"):
            series = [(lambda r, q=q: task_value(r, key, q), "-" if q == "inside" else "--")
                      for q in QUESTIONS]
        else:
            series = [(lambda r: r.get(key), "-")]
            if key == "passkey":
                series.append((lambda r: task_value(r, "passkey", "outside"), "--"))
        values = []
        for i, m in enumerate(methods):
            for value, line in series:
                pts = sorted((r["achieved_b"], value(r)) for r in rows
                             if r["method"] == m and value(r) is not None)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                values.extend(ys)
                style = "o" if len(pts) == 1 else "o" + line
                ax.plot(xs, ys, style, label=m if line == "-" else None, color=cmap(i % 20),
                        markersize=4, linewidth=1.2, fillstyle="full" if line == "-" else "none")
        ax.set_xlabel("achieved b (all wire bytes / FP16 bytes)")
        ax.set_ylabel(label)
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
