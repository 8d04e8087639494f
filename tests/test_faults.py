"""Runs that are large, long or misused: torchrun data parallelism, SIGKILL and resume, NaN losses."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from methods import cl_lora, seq_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"train_seconds", "seconds_per_step", "task_seconds", "eval_seconds"}


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "CIL_DIST_BACKEND": "gloo"}


def only_run(out):
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def load(d, name):
    with open(os.path.join(d, name)) as f:
        return json.load(f)


def results(d):
    r = load(d, "results.json")
    for row in r["per_task"]:
        for k in TIMING:
            row.pop(k)
    return r


def checkpoint(d):
    return torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)


KD_UPDATE = "kd_update" in {f.name for f in cl_lora.Config.__dataclass_fields__.values()}
GLOO = [("inflora", []),  # a gradient projection
        pytest.param("cl_lora", ["--kd-update", "two_step"], id="cl_lora-two_step",  # a loss generator: 2 steps
                     marks=pytest.mark.skipif(not KD_UPDATE, reason="cl_lora has no --kd-update option yet")),
        pytest.param("cl_lora", ["--kd-update", "joint"], id="cl_lora-joint",  # a second forward pass (KD)
                     marks=pytest.mark.skipif(not KD_UPDATE, reason="cl_lora has no --kd-update option yet"))]


@pytest.mark.parametrize("method,extra", GLOO)
def test_two_gloo_processes_match_one_process(tmp_path, method, extra):
    common = ["train.py", "--method", method, "--preset", "smoke", "--tasks", "2", "--epochs", "1",
              "--batch-size", "32", "--quiet", *extra]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env1(),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env1(), capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    d1, d2 = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    assert load(d2, "config.json")["processes"] == 2
    # only rank 0 prints, the method hooks' progress lines included
    assert len(two.stdout.splitlines()) == len(one.stdout.splitlines()) > 0, (one.stdout, two.stdout)
    r1, r2 = results(d1), results(d2)
    assert r1["acc_matrix"] == r2["acc_matrix"]
    steps = [p["optimizer_steps"] for p in r1["per_task"]]
    assert [p["optimizer_steps"] for p in r2["per_task"]] == steps
    if extra == ["--kd-update", "two_step"]:  # task 2 takes the KD step and the CE step for every batch
        assert steps[1] == 2 * r1["per_task"][1]["steps"]
    s1, s2 = checkpoint(d1)["state"], checkpoint(d2)["state"]
    assert s1.keys() == s2.keys()
    # the parameters the last task trained (the rest is frozen or derived from them)
    torch.manual_seed(0)
    cfg = train.METHODS[method].Config(batch_size=32, epochs=1)
    m = train.METHODS[method].Method(train.bb.create("vit_tiny_test")[0], 10, cfg)
    for t in range(2):
        m.grow(t, list(range(5 * t, 5 * t + 5)))
    trained = [k for k, p in m.named_parameters() if p.requires_grad]
    assert trained
    diff = max((s1[k].double() - s2[k].double()).abs().max().item() for k in trained)
    assert diff <= 1e-5, diff


def test_sigkill_mid_task_then_resume_equals_uninterrupted(tmp_path):
    """Killed (SIGKILL: no clean-up of any kind) as soon as task 1's checkpoint is on disk, i.e. while task 1's
    outputs are written or task 2 trains; the resumed run ends exactly like the uninterrupted one."""
    common = [sys.executable, "train.py", "--method", "seq_lora", "--preset", "smoke", "--tasks", "2", "--quiet"]
    full = subprocess.run([*common, "--out", str(tmp_path / "full")], cwd=ROOT, env=env1(), capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen([*common, "--out", str(out)], cwd=ROOT, env=env1(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        runs = os.listdir(out) if out.exists() else []
        if runs and os.path.exists(os.path.join(out, runs[0], "checkpoint.pt")):
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    d = only_run(out)
    assert len(checkpoint(d)["progress"]["acc"]) == 1, "not killed inside task 2"
    r = subprocess.run([sys.executable, "train.py", "--resume", d, "--quiet"], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after task 1/2" in r.stdout
    a, b = results(only_run(tmp_path / "full")), results(d)
    assert a == b and b["tasks_done"] == 2  # nothing lost, nothing repeated
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]  # a write the kill cut short was redone


def test_nan_loss_names_task_epoch_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    orig = seq_lora.SeqLoRA.loss

    def poisoned(self, x, y):  # task 2, third step
        poisoned.calls = getattr(poisoned, "calls", 0) + (len(self.heads) == 2)
        loss = orig(self, x, y)
        return loss * float("nan") if poisoned.calls == 3 else loss

    monkeypatch.setattr(seq_lora.SeqLoRA, "loss", poisoned)
    code = train.main(["--method", "seq_lora", "--preset", "smoke", "--tasks", "2", "--epochs", "1", "--quiet",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "task 2, epoch 1, step 3" in err and "nan" in err and "--amp none" not in err  # amp is already none
    d = only_run(tmp_path)
    assert len(checkpoint(d)["progress"]["acc"]) == 1
    assert len(load(d, "results.json")["acc_matrix"]) == 1  # what task 1 wrote is intact
