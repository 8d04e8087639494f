"""train.py end to end: smoke runs, determinism, resume, outputs and bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
TIMING = {"train_seconds", "seconds_per_step", "task_seconds", "eval_seconds"}


def run_cli(*args, check=True):
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def run_dir(out):
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def results(d):
    with open(os.path.join(d, "results.json")) as f:
        r = json.load(f)
    for row in r["per_task"]:
        for k in TIMING:
            row.pop(k)
    return r


@pytest.mark.parametrize("method", ["seq_lora", "simple_cil"])
def test_smoke_run_writes_the_outputs(tmp_path, method):
    run_cli("--method", method, "--preset", "smoke", "--tasks", "5", "--out", str(tmp_path), "--quiet")
    d = run_dir(tmp_path)
    assert os.path.basename(d).startswith(f"digits__{method}__s0__")
    r = results(d)
    assert [len(row) for row in r["acc_matrix"]] == [1, 2, 3, 4, 5]
    n_digits_test = len(train.cil_data.load_dataset("digits", "").test)
    assert r["task_sizes"] == [2] * 5 and r["seen_test_samples"][-1] == sum(r["n_test"]) == n_digits_test
    assert r["last_acc"] == pytest.approx(r["curve"][-1]) and 0 <= r["last_acc"] <= 100
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["run"]["method"] == method and cfg["class_order"] == train.cil_data.class_order(10, 1993)
    assert os.path.isfile(os.path.join(d, "acc_matrix.csv")) and os.path.isfile(os.path.join(d, "acc_curve.png"))
    assert sorted(f for f in os.listdir(d) if f.startswith("checkpoint")) == ["checkpoint_task5.pt"]
    sd = torch.load(os.path.join(d, "checkpoint_task5.pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    counts = [p["trainable_params"] for p in r["per_task"]]
    if method == "seq_lora":  # the shared LoRA (q, v of 2 blocks, r = 10, d = 32) plus the current head
        assert counts == [2 * 2 * 2 * 10 * 32 + 2 * 32 + 2] * 5
        assert [p["stored_params"] for p in r["per_task"]] == [2560 + 66 * (t + 1) for t in range(5)]
    else:
        assert counts == [0] * 5


def test_same_seed_same_results_and_resume_equals_uninterrupted(tmp_path):
    common = ["--method", "seq_lora", "--preset", "smoke", "--tasks", "5", "--epochs", "1", "--quiet"]
    run_cli(*common, "--out", str(tmp_path / "a"))
    run_cli(*common, "--out", str(tmp_path / "b"))
    a, b = results(run_dir(tmp_path / "a")), results(run_dir(tmp_path / "b"))
    assert a == b
    run_cli(*common, "--out", str(tmp_path / "c"), "--stop-after", "2")
    c = run_dir(tmp_path / "c")
    assert results(c)["tasks_done"] == 2
    p = run_cli("--resume", c, "--quiet")
    assert "resuming" in p.stdout
    assert results(c) == a
    sd_a = torch.load(os.path.join(run_dir(tmp_path / "a"), "checkpoint_task5.pt"), weights_only=True)
    sd_c = torch.load(os.path.join(c, "checkpoint_task5.pt"), weights_only=True)
    assert sd_a.keys() == sd_c.keys() and all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)


def test_joint_training_is_one_task(tmp_path):
    run_cli("--method", "seq_lora", "--preset", "smoke", "--tasks", "1", "--out", str(tmp_path), "--quiet")
    r = results(run_dir(tmp_path))
    assert r["acc_matrix"][0] and r["last_acc"] == r["avg_inc_acc"] and r["forgetting"] == 0.0


def test_method_options_reach_the_config(tmp_path):
    run_cli("--method", "seq_lora", "--preset", "smoke", "--tasks", "2", "--rank", "3", "--loss", "full",
            "--lr", "0.01", "--epochs", "1", "--out", str(tmp_path), "--quiet")
    d = run_dir(tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        mc = json.load(f)["method_config"]
    assert (mc["rank"], mc["loss"], mc["lr"], mc["epochs"]) == (3, "full", 0.01, 1)
    assert results(d)["per_task"][0]["trainable_params"] == 2 * 2 * 2 * 3 * 32 + 5 * 33


def test_help_lists_method_options():
    p = run_cli("--method", "seq_lora", "--help")
    assert "--rank" in p.stdout and "LoRA rank" in p.stdout and "--preset" in p.stdout


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "cifar100.npz").write_bytes(b"\x00" * 100)
    from conftest import tiny_vit
    torch.save(tiny_vit().state_dict(), tmp_path / "tiny.pth")
    return tmp_path


SMOKE = ["--preset", "smoke", "--quiet"]
BAD = [
    (["--method", "nope"], "unknown method"),
    (["--method", "seq_lora", "--preset", "gpu"], "invalid choice"),
    (["--method", "seq_lora", *SMOKE, "--dataset", "mnist"], "invalid choice"),
    (["--method", "seq_lora", *SMOKE, "--tasks", "0"], "--tasks must be at least 1"),
    (["--method", "seq_lora", *SMOKE, "--tasks", "11"], "more than the 10 classes"),
    (["--method", "seq_lora", *SMOKE, "--tasks", "3"], "equal tasks"),
    (["--method", "seq_lora", *SMOKE, "--init-cls", "12"], "more than the 10 classes"),
    (["--method", "seq_lora", *SMOKE, "--lr", "-1"], "--lr must be"),
    (["--method", "seq_lora", *SMOKE, "--rank", "0"], "--rank must be >= 1"),
    (["--method", "seq_lora", *SMOKE, "--epochs", "-2"], "--epochs must be"),
    (["--method", "seq_lora", *SMOKE, "--batch-size", "0"], "--batch-size"),
    (["--method", "seq_lora", *SMOKE, "--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--method", "seq_lora", *SMOKE, "--device", "cuda"], "no CUDA device"),
    (["--method", "seq_lora", *SMOKE, "--tasks", "x"], "invalid int value"),
    (["--method", "seq_lora", *SMOKE, "--frobnicate"], "unrecognized arguments"),
    (["--method", "seq_lora", *SMOKE, "--dataset", "cifar100", "--data-root", "{tmp}/nowhere"], "three ways"),
    (["--method", "seq_lora", *SMOKE, "--dataset", "cifar100", "--data-root", "{tmp}/corrupt"], "cannot read"),
    (["--method", "seq_lora", *SMOKE, "--weights", "{tmp}/missing.pth"], "does not exist"),
    (["--method", "seq_lora", "--preset", "cpu", "--dataset", "digits", "--weights", "{tmp}/tiny.pth"],
     "do not fit the backbone"),
    (["--resume", "{tmp}/no_run"], "not a run directory"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a)[-40:] for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, bad_files, capsys, monkeypatch):
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", _offline)  # never try to download in tests
    out = bad_files / "runs"
    argv = [a.replace("{tmp}", str(bad_files)) for a in argv] + ["--out", str(out)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err
    assert not out.exists()  # no half-written run


def _offline(*a, **k):
    raise RuntimeError("offline")


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    run_cli("--method", "simple_cil", "--preset", "smoke", "--tasks", "2", "--out", str(tmp_path), "--quiet",
            "--stop-after", "1")
    d = run_dir(tmp_path)
    for argv, msg in ((["--method", "seq_lora"], "the run has method='simple_cil'"),
                      (["--dataset", "cifar100"], "the run has dataset='digits'"),
                      (["--tasks", "5"], "the run has tasks=2")):
        assert train.main(["--resume", d, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    # a corrupt checkpoint is a clear error, not a traceback
    with open(os.path.join(d, "checkpoint_task1.pt"), "wb") as f:
        f.write(b"truncated")
    assert train.main(["--resume", d]) == 2
    assert "checkpoint cannot be loaded" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(tmp_path):
    p = run_cli("--method", "seq_lora", "--preset", "smoke", "--tasks", "0", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "cifar100_mini.npz")), reason="no shared data")
def test_cifar_mini_run_with_small_vit(tmp_path):
    """The cpu preset's pipeline (32 px CIFAR, small ViT shape, bf16) on the mini split, random weights."""
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(os.path.join(SHARED_DATA, "cifar100_mini.npz"), root / "cifar100.npz")
    run_cli("--method", "seq_lora", "--preset", "cpu", "--weights", "random", "--data-root", str(root),
            "--tasks", "2", "--init-cls", "50", "--epochs", "1", "--out", str(tmp_path / "runs"), "--quiet",
            "--stop-after", "1")
    r = results(run_dir(tmp_path / "runs"))
    assert r["n_test"] == [150] and np.isfinite(r["per_task"][0]["final_loss"])


def test_paper_preset_weights_per_method():
    args, _ = train.resolve({"method": "sd_lora"}, {})
    assert args.weights == "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # SD-LoRA's code uses the IN-1K tag
    args, _ = train.resolve({"method": "cl_lora"}, {})
    assert args.weights == "vit_base_patch16_224.augreg_in21k" and args.backbone == "vit_base_patch16_224"
    args, _ = train.resolve({"method": "sd_lora", "weights": "x.pth"}, {})
    assert args.weights == "x.pth"
