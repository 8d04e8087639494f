"""The train.py command for every row of bench/paper_numbers.json: what to run on a GPU to reproduce a paper's table.

    python bench/paper_runs.py --list                         # every command, one per paper row
    python bench/paper_runs.py --list --dataset imagenet_r --data-root DIR   # one dataset's, with its data
    python bench/paper_table.py runs/paper/*                  # then ours against the papers'

Each command runs `--preset paper` (ViT-B/16, 224 px) with the method's official settings for the dataset
(the OFFICIAL dict of its file). A number one paper reports for another paper's method (SD-LoRA's tables
re-run InfLoRA) gets `--protocol common` and the reporting paper's class order, with the method's own
hyperparameters: the reporting paper's are not published. The datasets come from prepare.py (README,
Datasets). One command is one seed; the papers average 5 (SD-LoRA, InfLoRA) or 10 (CL-LoRA) runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NUMBERS = os.path.join(ROOT, "bench", "paper_numbers.json")

ROWS = {  # paper_numbers.json's row -> train.py options; None: nothing here runs it
    "sd_lora": ["--method", "sd_lora"],
    "sd_lora_rr": ["--method", "sd_lora", "--variant", "rr"],
    "sd_lora_kd": ["--method", "sd_lora", "--variant", "kd"],
    "inflora": ["--method", "inflora"],
    "cl_lora": ["--method", "cl_lora"],
    "simple_cil": ["--method", "simple_cil"],
    "seq_finetune": None,  # sequential full fine-tuning; seq_lora is the LoRA lower bound, not this
}


def load(path: str = NUMBERS) -> list[dict]:
    with open(path) as fh:
        return json.load(fh)["rows"]


def order_of(reported_by: str, dataset: str) -> list[str]:
    """The class order of the reporting paper's official config for the dataset, as train.py options."""
    from methods import METHODS
    official = METHODS[ROWS[reported_by][1]].OFFICIAL.get(dataset, {})
    if official.get("natural_order"):
        return ["--natural-order"]
    return ["--order-seed", str(official.get("order_seed", 1993))]


def command(row: dict, out: str = "runs/paper") -> list[str] | None:
    """The train.py command of a paper row, or None where no method here corresponds."""
    options = ROWS.get(row["row"])
    if options is None:
        return None
    cmd = ["python", "train.py", *options, "--dataset", row["dataset"], "--tasks", str(row["tasks"])]
    method_row = {"sd_lora_rr": "sd_lora", "sd_lora_kd": "sd_lora"}.get(row["row"], row["row"])
    if row["reported_by"] != method_row:
        cmd += ["--protocol", "common", *order_of(row["reported_by"], row["dataset"])]
    return cmd + ["--out", out]


def runs(rows: list[dict]) -> list[tuple[dict, list[str] | None]]:
    """One (first paper row, command) per distinct command, in the file's order."""
    seen, out = set(), []
    for r in rows:
        cmd = command(r)
        key = tuple(cmd) if cmd else (r["row"], r["dataset"], r["tasks"])
        if key not in seen:
            seen.add(key)
            out.append((r, cmd))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="paper_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the train.py command of every paper row")
    p.add_argument("--dataset", help="only this dataset's rows")
    p.add_argument("--data-root", help="add --data-root DIR to every command (prepare.py's --out)")
    args = p.parse_args(argv)
    if not args.list:
        p.error("nothing to do: --list prints the commands")
    rows = [r for r in load() if args.dataset in (None, r["dataset"])]
    if not rows:
        p.error(f"no paper row for dataset '{args.dataset}'")
    for r, cmd in runs(rows):
        cmd = cmd and cmd + (["--data-root", args.data_root] if args.data_root else [])
        label = f"{r['row']} {r['dataset']} T={r['tasks']} ({r['reported_by']}'s {r['kind']})"
        print(f"# {label}\n" + (shlex.join(cmd) if cmd else "# no counterpart here: " + r["row"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
