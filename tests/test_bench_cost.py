"""bench/constant_cost.py --quick: a tiny ViT, T = 1, 2, one method; the results file's structure, its ratios,
the stored-parameter check against the growth formulas (EXPECTED), and the --table printer; --train-runs on a
made-up CIFAR-100 of one image per class."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "constant_cost.py")
sys.path.insert(0, os.path.join(REPO, "bench"))
import constant_cost as cc  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cc") / "cc.json")
    p = subprocess.run([sys.executable, SCRIPT, "--quick", "--methods", "sd_lora", "--out", out],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    with open(out) as f:
        return out, json.load(f), p.stdout


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_results_structure_and_ratios(quick):
    _, res, stdout = quick
    assert {"methods", "machine", "backbone", "settings"} <= set(res)
    assert res["settings"]["T"] == [1, 2] and res["backbone"]["embed_dim"] == 32
    r = res["methods"]["sd_lora"]
    for key in ("eval_ratio_to_backbone", "train_step_ratio_T2_to_T1", "peak_memory_ratio_T2_to_T1"):
        assert positive_finite(r[key]), (key, r[key])
    assert r["errors"] == {}
    assert set(r["cells"]) == {"1", "2"}
    for T, c in r["cells"].items():
        assert c["ok"] and c["T"] == int(T)
        for key in ("backbone_eval_s", "method_eval_s", "method_first_eval_s", "train_s_per_batch",
                    "peak_rss_over_floor_mib"):
            assert positive_finite(c[key]), (T, key, c[key])
        assert c["eval_ratio_to_backbone"] == pytest.approx(c["method_eval_s"] / c["backbone_eval_s"], rel=1e-3)
        assert len(c["stored_params_per_task"]) == int(T)
    # the ratios are the cells' numbers divided, not typed (rounded to the file's 4 decimals: a relative
    # tolerance would fail a small ratio, e.g. 0.0166 when other work slowed the T = 1 cell's steps)
    c1, c2 = r["cells"]["1"], r["cells"]["2"]
    assert r["train_step_ratio_T2_to_T1"] == round(c2["train_s_per_batch"] / c1["train_s_per_batch"], 4)
    assert r["eval_ratio_to_backbone"] == c2["eval_ratio_to_backbone"]
    # every goal is judged from its number (sd_lora has all three goals)
    for kind, bound, value in (("eval", 1.05, r["eval_ratio_to_backbone"]),
                               ("train", 1.15, r["train_step_ratio_T2_to_T1"]),
                               ("memory", 1.10, r["peak_memory_ratio_T2_to_T1"])):
        g = r["goals"][kind]
        assert g["status"] == ("met" if value <= bound else "missed")
        assert f"[{g['goal']}: {g['status']}]" in stdout  # printed next to its number
    # stored parameters: SD-LoRA adds a component per task (grows), and equals constant_cost.EXPECTED
    assert c2["stored_params"] > c1["stored_params"] > 0
    assert r["stored_params_match_formula"] is True and c2["stored_params"] == c2["stored_params_expected"]


def test_quick_table_prints_the_file(quick, capsys):
    out, res, _ = quick
    assert cc.main(["--table", "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if ln.startswith("| sd_lora "))
    r = res["methods"]["sd_lora"]
    assert f"{r['stored_params_T2']:,}" in row and f"{r['train_step_ratio_T2_to_T1']:.2f}" in row
    head = next(ln for ln in lines if ln.startswith("| method "))
    assert row.count("|") == head.count("|")  # header and rows have the same columns


def test_goal_rules():
    assert cc.goal("eval", "cl_lora", 3.0)["status"] == "n/a"  # the issue exempts CL-LoRA's branches
    assert cc.goal("eval", "keep_lora", 1.06)["status"] == "missed"
    assert cc.goal("train", "seq_lora", 2.0)["status"] == "n/a"  # the training goal names three methods
    assert cc.goal("train", "inflora", 1.15)["status"] == "met"
    assert cc.goal("memory", "sr2_lora", None)["status"] == "not measured"


def test_train_runs_measure_whole_runs_and_fit_the_growth(tmp_path):
    """--train-runs: one train.py process per (method, T), its own peak RSS, its stored counts = EXPECTED, and the
    growth per task fitted over T (seq_lora: a LoRA per block, nothing per task, d + 1 per class)."""
    import numpy as np
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar100_mini.npz", x_train=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(100, dtype=np.uint8), x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(100, dtype=np.uint8))
    out = tmp_path / "ls.json"
    cmd = [sys.executable, SCRIPT, "--train-runs", "--methods", "seq_lora", "--T", "2,4", "--data-dir", str(tmp_path),
           "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [(r["method"], r["tasks"]) for r in res["rows"]] == [("seq_lora", 2), ("seq_lora", 4)]
    floor = res["settings"]["import_only_peak_rss_mib"]
    for r in res["rows"]:
        assert r["returncode"] == 0 and len(r["stored_params"]) == r["tasks"] and r["stored_matches_expected"]
        assert r["peak_rss_mib"] > floor > 50  # a whole run above a process that only imports train.py
    a, b, residual = cc.fit_growth(res["rows"])
    assert (a, b, residual) == (pytest.approx(0.0), pytest.approx(193.0), pytest.approx(0.0))  # (d + 1)·n_t
    assert "seq_lora: measured growth/task = 0.0 + 193.00·n_t" in res["checks"][0]
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "ls2.json"), "--quick"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no --quick" in bad.stderr and not (tmp_path / "ls2.json").exists()

