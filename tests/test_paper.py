"""bench/paper_numbers.json, bench/paper_runs.py and bench/paper_table.py."""
import json
import os
import subprocess
import sys

import pytest

import train
from data import DATASETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import paper_runs  # noqa: E402
import paper_table  # noqa: E402

CLASSES = {"cifar100": 100, "imagenet_r": 200, "imagenet_a": 200, "cub": 200, "domainnet": 345}


def test_every_paper_row_is_well_formed_and_its_command_parses(tmp_path):
    rows = paper_runs.load()
    assert len(rows) >= 50
    for r in rows:
        assert r["row"] in paper_runs.ROWS and r["dataset"] in DATASETS and r["kind"] in ("paper", "log")
        assert CLASSES[r["dataset"]] % r["tasks"] == 0 and r["source"] and isinstance(r["verified"], bool)
        assert all(v is None or 0 <= v <= 100 for v in (r["last_acc"], r["avg_inc_acc"], r["forgetting"]))
        assert r["reported_by"] in paper_runs.ROWS and (r["last_acc"] is None) == (r["avg_inc_acc"] is None)
    for r, cmd in paper_runs.runs(rows):
        if cmd is None:
            assert paper_runs.ROWS[r["row"]] is None
            continue
        args, cfg, _ = train.parse(cmd[2:-2] + ["--out", str(tmp_path)])
        assert (args.dataset, args.tasks) == (r["dataset"], r["tasks"])
        own = r["reported_by"] == r["row"].split("_rr")[0].split("_kd")[0]
        assert args.protocol == ("official" if own else "common")
        if r["row"] == "sd_lora_rr":
            assert cfg.variant == "rr"


def test_a_row_reported_by_another_paper_takes_that_papers_class_order(tmp_path):
    row = {"row": "inflora", "dataset": "imagenet_r", "tasks": 10, "reported_by": "sd_lora"}
    args, _, _ = train.parse(paper_runs.command(row)[2:-2] + ["--out", str(tmp_path)])
    assert (args.order_seed, args.natural_order, args.protocol) == (1995, False, "common")  # SD-LoRA's INR order
    args, _, _ = train.parse(paper_runs.command({**row, "reported_by": "inflora"})[2:-2] + ["--out", str(tmp_path)])
    assert args.natural_order and args.protocol == "official"


def test_list_prints_one_command_per_row():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "paper_runs.py")]
    r = subprocess.run(cmd + ["--list", "--dataset", "domainnet", "--data-root", "/d"], capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("python train.py")]
    assert r.returncode == 0 and len(lines) == len([x for x, c in paper_runs.runs(
        [p for p in paper_runs.load() if p["dataset"] == "domainnet"]) if c])
    assert "python train.py --method sd_lora --dataset domainnet --tasks 5 --out runs/paper --data-root /d" in lines
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 2


def fake_run(path, method, dataset, tasks, last, avg, variant="base", protocol="official", done=None):
    os.makedirs(path)
    json.dump({"run": {"method": method, "dataset": dataset, "protocol": protocol},
               "method_config": {"variant": variant}, "identity": {"task_sizes": [1] * tasks}},
              open(os.path.join(path, "config.json"), "w"))
    json.dump({"last_acc": last, "avg_inc_acc": avg, "tasks_done": tasks if done is None else done},
              open(os.path.join(path, "results.json"), "w"))
    return str(path)


def test_paper_table_averages_seeds_and_gives_the_difference(tmp_path):
    runs = [fake_run(tmp_path / "a", "sd_lora", "imagenet_r", 10, 76.0, 81.0),
            fake_run(tmp_path / "b", "sd_lora", "imagenet_r", 10, 78.0, 83.0),
            fake_run(tmp_path / "c", "sd_lora", "imagenet_r", 5, 70.0, 75.0, variant="rr", protocol="common"),
            fake_run(tmp_path / "d", "c_lora", "cub", 10, 50.0, 60.0)]
    text = paper_table.table(runs, paper_runs.load())
    mean_of_two = "| sd_lora | imagenet_r | 10 | sd_lora paper | official | 2 | 77.34 | 77.00 | -0.34 | 82.04 | 82.00 |"
    assert mean_of_two + " -0.04 |" in text
    assert "| sd_lora_rr | imagenet_r | 5 | sd_lora paper | common (!) | 1 | 79.01 | 70.00 | -9.01 |" in text
    assert "| c_lora | cub | 10 | no paper number | official | 1 | - | 50.00 |" in text
    assert "| inflora | imagenet_r | 5 | inflora paper | official | 1 | 77.52? |" in paper_table.table(
        [fake_run(tmp_path / "e", "inflora", "imagenet_r", 5, 70.0, 75.0)], paper_runs.load())  # unverified: '?'
    unfinished = fake_run(tmp_path / "f", "sd_lora", "cub", 10, 1.0, 1.0, done=3)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "paper_table.py"), unfinished],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"paper_table.py: error: {unfinished}: unfinished (3 of 10 tasks)"
    with pytest.raises(ValueError, match="not a run directory"):
        paper_table.read_run(str(tmp_path))
