"""Print a markdown table comparing runs from their results.json files (numbers are read, never typed).

    python bench/compare_runs.py two_step=bench/results/cl_lora_kd_update/two_step_results.json \
                                 joint=bench/results/cl_lora_kd_update/joint_results.json

One row per run: a_t after every finished task, the accuracy on the old and on the newest task's classes after
the last finished task, and the seconds per training batch and per optimiser step of every task.
"""
from __future__ import annotations

import json
import sys


def row(name: str, path: str) -> str:
    with open(path) as f:
        r = json.load(f)
    acc, n = r["acc_matrix"], r["n_test"]
    last = acc[-1]
    old = sum(a * k for a, k in zip(last[:-1], n[:-1])) / max(sum(n[:-1]), 1) if len(last) > 1 else float("nan")
    per = r["per_task"]
    batch = " / ".join(f"{p['train_seconds'] / max(p['steps'], 1):.3f}" for p in per)
    steps = " / ".join(str(p.get("optimizer_steps", p["steps"])) for p in per)
    curve = " / ".join(f"{a:.2f}" for a in r["curve"])
    return f"| {name} | {curve} | {old:.2f} | {last[-1]:.2f} | {steps} | {batch} |"


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    print("| run | a_t after each task | old classes (last task) | newest task | optimiser steps per task "
          "| s per batch per task |")
    print("|---|---|---|---|---|---|")
    for a in argv:
        name, path = a.split("=", 1)
        print(row(name, path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
