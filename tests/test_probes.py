"""The probes of a finished run (bench/probes/*_probe.py) on smoke runs: each reproduces the run's own score
before it changes anything, and a run of the wrong method is one error line."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """method -> (run directory, its results.json) of a 2-task smoke run."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, extra in (("seq_lora", []), ("cl_lora", []), ("sr2_lora", []), ("inflora", ["--ca"])):
        dest = root / method
        r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--method", method, "--preset", "smoke",
                            "--weights", "random", "--tasks", "2", "--out", str(dest), *extra],
                           capture_output=True, text=True, cwd=str(root), timeout=300)
        assert r.returncode == 0, r.stderr
        (run,) = dest.iterdir()
        out[method] = (run, json.loads((run / "results.json").read_text()))
        if method == "inflora":  # its memory widths after task 1, all in 'remove' mode at these sizes
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith("[inflora] task 1: eps_t"))
            out["inflora_widths"] = [int(w) for w in line.split("memory width per block ")[1].split(" (R")[0].split()]
    return out


def probe(script, run, tmp_path, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "probes", script), str(run), "--threads", "1",
                           *extra],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)


def test_task_id_probe_splits_the_runs_accuracy(runs, tmp_path):
    run, res = runs["seq_lora"]
    r = probe("task_id_probe.py", run, tmp_path, "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert abs(p["task_agnostic"] - res["last_acc"]) < 0.01
    assert p["within_task"] >= p["task_agnostic"] and sum(p["won"]) == p["images"] == sum(res["n_test"])


def test_ncm_probe_scores_the_runs_classifier_as_the_run_did(runs, tmp_path):
    run, res = runs["seq_lora"]
    r = probe("ncm_probe.py", run, tmp_path, "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert abs(p["run"]["acc"] - res["last_acc"]) < 0.01
    assert sum(p["ncm"]["won"]) == sum(p["run"]["won"]) == p["images"]


def test_ncm_probe_refuses_a_method_without_a_folded_backbone(runs, tmp_path):
    r = probe("ncm_probe.py", runs["cl_lora"][0], tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: cl_lora does not evaluate through a folded backbone (it has no merged())"]


def test_cl_lora_proto_probe_stored_prototypes_are_the_runs(runs, tmp_path):
    run, res = runs["cl_lora"]
    r = probe("cl_lora_proto_probe.py", run, tmp_path, "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert abs(p["stored"]["acc"] - res["last_acc"]) < 0.01
    assert p["cos_stored_fresh"][-1] > 0.9999  # the last task's prototypes were stored by the final model


def test_sr2_ca_probe_starts_from_the_runs_heads(runs, tmp_path):
    run, res = runs["sr2_lora"]
    r = probe("sr2_ca_probe.py", run, tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("checkpoint")]
    assert abs(float(re.search(r"test acc +([\d.]+)", line).group(1)) - res["last_acc"]) < 0.01
    assert len([ln for ln in r.stdout.splitlines() if "test acc" in ln]) == 4  # the checkpoint and three losses


@pytest.mark.parametrize("script,method", [("cl_lora_proto_probe.py", "cl_lora"), ("sr2_ca_probe.py", "sr2_lora"),
                                           ("inflora_memory_probe.py", "inflora")])
def test_a_run_of_another_method_is_one_error_line(runs, tmp_path, script, method):
    run = runs["seq_lora"][0]
    r = probe(script, run, tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {run} is a seq_lora run, not {method}"]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("method,variants", [("inflora", 6), ("sr2_lora", 2)])  # inflora --ca; sr2_lora --ca sr2
def test_ca_stats_probe_reproduces_the_run_and_finds_the_last_tasks_statistics_fresh(runs, tmp_path, method,
                                                                                     variants):
    run, res = runs[method]
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}
    r = probe("ca_stats_probe.py", run, tmp_path, "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert abs(p["checkpoint"]["acc"] - res["last_acc"]) < 0.01
    last = p["drift"][-1]  # stored at the last task, by the same backbone up to the fold's rounding
    assert last["cos"] > 0.9999 and last["rel_shift"] < 1e-3
    assert len(p["variants"]) == variants
    for s in p["variants"].values():
        assert sum(s["won"]) == p["images"] and 0 <= s["acc"] <= 100
    stored = next(v for k, v in p["variants"].items() if k.startswith("as the run"))
    assert p["variants"]["fresh statistics"] != stored  # task 1's statistics have moved
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in run.iterdir()} == files  # run untouched
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]


def test_ca_stats_probe_refuses_a_run_without_alignment(runs, tmp_path):
    run = runs["seq_lora"][0]
    r = probe("ca_stats_probe.py", run, tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {run} is not an inflora --ca or sr2_lora --ca run"]


def test_memory_probe_rebuilds_the_task_1_memory_and_the_papers_criterion_keeps_at_least_as_much(runs, tmp_path):
    r = probe("inflora_memory_probe.py", runs["inflora"][0], tmp_path, "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    blocks = json.loads((tmp_path / "p.json").read_text())["blocks"]
    assert [b["code"]["directions"] for b in blocks] == runs["inflora_widths"]  # the run's task-1 memory, recomputed
    for b in blocks:
        assert b["paper"]["directions"] >= b["code"]["directions"]
        assert b["paper"]["captured"] >= b["code"]["captured"] - 1e-9
        assert b["captured_final_memory"] >= b["code"]["captured"] - 1e-9  # the memory only grows
