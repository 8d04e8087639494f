"""bench/ca_stats_probe.py on smoke runs: it reproduces the run's score, the last task's statistics are fresh,
it restores the method, and it refuses a run that has no alignment to re-run."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_run(tmp_path, method, *extra):
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--method", method, "--preset", "smoke",
                        "--weights", "random", "--tasks", "2", "--out", str(out), *extra],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    (run,) = out.iterdir()
    return run


def probe(tmp_path, run, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "ca_stats_probe.py"), str(run),
                           "--threads", "1", *extra], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)


@pytest.mark.parametrize("method,ca,variants", [("inflora", ["--ca"], 6), ("sr2_lora", ["--ca", "ce"], 2)])
def test_probe_reproduces_the_run_and_finds_the_last_tasks_statistics_fresh(tmp_path, method, ca, variants):
    run = smoke_run(tmp_path, method, *ca)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}
    out = tmp_path / "probe.json"
    r = probe(tmp_path, run, "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert abs(res["checkpoint"]["acc"] - json.loads((run / "results.json").read_text())["last_acc"]) < 0.01
    last = res["drift"][-1]  # stored at the last task, by the same backbone up to the fold's rounding
    assert last["cos"] > 0.9999 and last["rel_shift"] < 1e-3
    assert len(res["variants"]) == variants
    for s in res["variants"].values():
        assert sum(s["won"]) == res["images"] and 0 <= s["acc"] <= 100
    # the variants differ where they change what the alignment fits
    stored = next(v for k, v in res["variants"].items() if k.startswith("as the run"))
    assert res["variants"]["fresh statistics"] != stored
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()} == files  # run untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json", "runs"]


def test_a_run_without_alignment_is_one_error_line(tmp_path):
    run = smoke_run(tmp_path, "inflora", "--stop-after", "1")
    r = probe(tmp_path, run)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {run} is not an inflora --ca or sr2_lora --ca run"]


def test_memory_probe_rebuilds_the_task_1_memory_and_the_papers_criterion_keeps_at_least_as_much(tmp_path):
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--method", "inflora", "--preset", "smoke",
                        "--weights", "random", "--tasks", "2", "--out", str(out)],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("[inflora] task 1: eps_t"))
    widths = [int(w) for w in line.split("memory width per block ")[1].split(" (R")[0].split()]  # 'remove' mode
    (run,) = out.iterdir()
    res_file = tmp_path / "memory.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "inflora_memory_probe.py"), str(run),
                        "--threads", "1", "--json", str(res_file)], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    blocks = json.loads(res_file.read_text())["blocks"]
    assert [b["code"]["directions"] for b in blocks] == widths  # the run's own task-1 memory, recomputed
    for b in blocks:
        assert b["paper"]["directions"] >= b["code"]["directions"]
        assert b["paper"]["captured"] >= b["code"]["captured"] - 1e-9
        assert b["captured_final_memory"] >= b["code"]["captured"] - 1e-9  # the memory only grows
