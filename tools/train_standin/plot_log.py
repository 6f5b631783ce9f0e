#!/usr/bin/python3
"""Plots train.py's JSON-lines log: LM loss, retrieved-digit loss and held-out loss per step.

Usage: plot_log.py TRAIN.log OUT.png
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    steps, lm, answer, evals = [], [], [], []
    phases = []
    with open(sys.argv[1]) as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("event") == "step":
                steps.append(e["step"])
                lm.append(e["lm_loss"])
                answer.append(e["answer_loss"])
            elif e.get("event") == "eval":
                evals.append((e["step"], e["held_out_loss"], e["passkey_acc"], e["seq"]))
            elif e.get("event") == "phase":
                phases.append((e["step"], e["seq"]))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, lm, label="LM loss (train, nats/byte)")
    ax[0].plot(steps, answer, label="loss on retrieved key digits")
    if evals:
        ax[0].plot([e[0] for e in evals], [e[1] for e in evals], "o-",
                   label="held-out loss (at the phase's length)")
    ax[0].axhline(math.log(10), color="gray", linestyle=":", label="ln 10 (guessing a digit)")
    for step, seq in phases:
        ax[0].axvline(step, color="k", alpha=0.15)
        ax[0].text(step, ax[0].get_ylim()[1] * 0.95, f" seq {seq}", fontsize=7)
    ax[0].set_xlabel("step")
    ax[0].legend(fontsize=7)
    ax[0].grid(True, alpha=0.3)
    if evals:
        ax[1].plot([e[0] for e in evals], [e[2] for e in evals], "o-")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("passkey exact match (20 held-out prompts, phase length)")
    ax[1].set_ylim(-0.05, 1.05)
    ax[1].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    sys.exit(main())
