"""Our runs against the papers' numbers, row by row: python bench/paper_table.py RUN_DIR...

A run matches the rows of bench/paper_numbers.json with its method (and variant), dataset and number of tasks.
Runs of one row (several seeds) are averaged. Per row: the paper's A_T and Ā, ours, and ours minus the paper's;
a paper value marked '?' has no source this project could read (paper_numbers.json, `verified`). Runs of another
protocol than the command bench/paper_runs.py gives for the row are shown on their own line, marked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_runs import load  # noqa: E402


def read_run(run_dir: str) -> dict:
    """(row, dataset, tasks, protocol) of a finished run and its A_T, Ā; ValueError if it is not one."""
    try:
        with open(os.path.join(run_dir, "config.json")) as fh:
            config = json.load(fh)
        with open(os.path.join(run_dir, "results.json")) as fh:
            results = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{run_dir}: not a run directory ({e})") from None
    run, sizes = config["run"], config["identity"]["task_sizes"]
    if results.get("tasks_done") != len(sizes):
        raise ValueError(f"{run_dir}: unfinished ({results.get('tasks_done')} of {len(sizes)} tasks)")
    variant = config["method_config"].get("variant", "base")
    return {"row": run["method"] + ("" if variant == "base" else f"_{variant}"), "dataset": run["dataset"],
            "tasks": len(sizes), "protocol": run.get("protocol", "common"), "last_acc": results["last_acc"],
            "avg_inc_acc": results["avg_inc_acc"]}


def fmt(v, verified: bool = True) -> str:
    return "-" if v is None else f"{v:.2f}" + ("" if verified else "?")


def table(run_dirs: list[str], rows: list[dict]) -> str:
    runs: dict[tuple, list[dict]] = {}
    for d in run_dirs:
        r = read_run(d)
        runs.setdefault((r["row"], r["dataset"], r["tasks"], r["protocol"]), []).append(r)
    lines = ["| row | dataset | T | source | protocol | runs | paper A_T | ours | diff | paper Ā | ours | diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    matched = set()
    for p in rows:
        own = p["reported_by"] == {"sd_lora_rr": "sd_lora", "sd_lora_kd": "sd_lora"}.get(p["row"], p["row"])
        for key, rs in runs.items():
            if key[:3] != (p["row"], p["dataset"], p["tasks"]):
                continue
            matched.add(key)
            cells = [f"{p['reported_by']} {p['kind']}", key[3] + ("" if (key[3] == "official") == own else " (!)"),
                     str(len(rs))]
            for m in ("last_acc", "avg_inc_acc"):
                ours = sum(r[m] for r in rs) / len(rs)
                cells += [fmt(p[m], p["verified"]), f"{ours:.2f}", "-" if p[m] is None else f"{ours - p[m]:+.2f}"]
            lines.append(f"| {p['row']} | {p['dataset']} | {p['tasks']} | " + " | ".join(cells) + " |")
    for key, rs in runs.items():
        if key not in matched:
            ours = [f"{sum(r[m] for r in rs) / len(rs):.2f}" for m in ("last_acc", "avg_inc_acc")]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | no paper number | {key[3]} | {len(rs)} | - | {ours[0]} "
                         f"| - | - | {ours[1]} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="paper_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (train.py's output)")
    args = p.parse_args(argv)
    try:
        print(table(args.runs, load()))
    except ValueError as e:
        print(f"paper_table.py: error: {e}", file=sys.stderr)
        return 2
    print("\n(!): a protocol other than paper_runs.py's command for the row; ?: paper value without a readable source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
