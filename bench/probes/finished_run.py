"""What every probe of a finished run does first: read its command line, rebuild the run from its checkpoint.

A probe script calls `open_run(__doc__, ...)`; its command line is then

    RUN_DIR [--data-root D] [--weights W] [--json F] [--threads N]

(--weights and --json only where asked for). The run's options come from its config.json (train.py --resume's
rules: data and weights must be the run's); a run of another method is one error line and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train  # noqa: E402


def open_run(doc: str, methods: tuple[str, ...] = (), weights: bool = False, json_out: bool = True,
             argv: list[str] | None = None):
    """-> (the probe's arguments, the run's TrainArgs, its method Config, the data stream, the method with the
    finished tasks' state loaded, in eval mode, the run's progress: its accuracy matrix so far)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data-root", default=None, help="only if the data has moved since the run")
    if weights:
        p.add_argument("--weights", default=None, help="only if the run's weights file has moved")
    if json_out:
        p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    extra = (["--data-root", a.data_root] if a.data_root else []) + (
        ["--weights", a.weights] if getattr(a, "weights", None) else [])
    args, cfg, saved = train.parse(["--resume", a.run_dir] + extra)
    if methods and args.method not in methods:
        sys.exit(f"error: {a.run_dir} is a {args.method} run, not {' or '.join(methods)}")
    stream, m, _, _, _, progress = train.setup(args, cfg, saved)  # rebuilds the finished tasks, loads the state
    m.eval()
    return a, args, cfg, stream, m, progress


def scores(pred: torch.Tensor, y: torch.Tensor, task_of: torch.Tensor, k: int) -> dict:
    """Accuracy, task-id accuracy (%) and the images each task's classes win; task_of: class -> its task."""
    return {"acc": 100 * (pred == y).float().mean().item(),
            "task_id": 100 * (task_of[pred] == task_of[y]).float().mean().item(),
            "won": torch.bincount(task_of[pred], minlength=k).tolist()}


def write_json(path: str | None, out: dict) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
