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
    assert "start a new run with a lower --lr" in err and "--resume" not in err  # resume keeps the --lr
    d = only_run(tmp_path)
    assert len(checkpoint(d)["progress"]["acc"]) == 1
    assert len(load(d, "results.json")["acc_matrix"]) == 1  # what task 1 wrote is intact


def small_fs(path, size):
    """A real tmpfs of `size` at `path` (root only); False where it cannot be mounted."""
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_line_and_resume_after_freeing_space_is_exact(tmp_path):
    """--out on a full filesystem (a 64 KB tmpfs; without one, a per-file size limit set by the OS, RLIMIT_FSIZE):
    one error line naming the file, the OS reason and the resume command, exit 1, no .tmp left, the finished
    tasks intact; after freeing space the resumed run ends exactly like an uninterrupted one."""
    common = [sys.executable, "train.py", "--method", "seq_lora", "--preset", "smoke", "--tasks", "5", "--epochs",
              "1", "--quiet"]
    full = subprocess.run([*common, "--out", str(tmp_path / "full")], cwd=ROOT, env=env1(), capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    disk = tmp_path / "disk"
    mounted = small_fs(disk, "64k")

    def limit():  # fallback: every file written is cut at 20 kB, the write fails with EFBIG
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    try:
        p = subprocess.run([*common, "--out", str(disk)], cwd=ROOT, env=env1(), capture_output=True, text=True,
                           timeout=600, preexec_fn=None if mounted else limit)
        err = p.stderr.strip()
        assert p.returncode == 1 and "\n" not in err, p.stderr
        d = only_run(disk)
        assert err.startswith(f"train.py: error: cannot write {d}/")
        assert ("no space left on device" if mounted else "file too large") in err
        assert err.endswith(f"continue with: {sys.executable} {os.path.join(ROOT, 'train.py')} --resume {d}")
        assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
        done = len(checkpoint(d)["progress"]["acc"]) if os.path.exists(os.path.join(d, "checkpoint.pt")) else 0
        assert done < 5 and load(d, "config.json")["run"]["tasks"] == 5
        if os.path.exists(os.path.join(d, "results.json")):  # written after the checkpoint: never ahead of it
            assert load(d, "results.json")["tasks_done"] <= done
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        r = subprocess.run([sys.executable, "train.py", "--resume", d, "--quiet"], cwd=ROOT, env=env1(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert results(only_run(tmp_path / "full")) == results(d)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def test_unwritable_out_and_read_only_resume_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--method", "seq_lora", "--preset", "smoke", "--out",
                        "/proc/foo"], cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stderr.startswith("train.py: error: --out /proc/foo: cannot write in /proc: ")
    assert p.stderr.count("\n") == 1 and not os.path.exists("/proc/foo")
    a = subprocess.run([sys.executable, "train.py", "--method", "simple_cil", "--preset", "smoke", "--tasks", "2",
                        "--quiet", "--out", str(tmp_path / "a")], cwd=ROOT, env=env1(), capture_output=True,
                       text=True, timeout=600)
    assert a.returncode == 0, a.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "a"), str(ro)], capture_output=True).returncode:
        pytest.skip("no read-only bind mount here (needs root)")
    try:
        d = only_run(ro)
        r = subprocess.run([sys.executable, "train.py", "--resume", d], cwd=ROOT, env=env1(), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"cannot write {d}/.lock: read-only file system" in r.stderr
    finally:
        subprocess.run(["umount", str(ro)])


def one_error(capsys, argv, code=2):
    assert train.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    return err


def test_message_hints(tmp_path, capsys, monkeypatch):
    S = ["--method", "seq_lora", "--preset", "smoke", "--quiet", "--out", str(tmp_path / "runs")]
    (tmp_path / "w.json").write_text('{"normalize": {}}')
    err = one_error(capsys, [*S, "--weights", str(tmp_path / "w.json")])
    assert "is not a weights file" in err and "sidecar" in err and "weights_only" not in err
    torch.save(train.bb.create("vit_small32", "random")[0].state_dict(), tmp_path / "s32.pth")
    err = one_error(capsys, [*S, "--weights", str(tmp_path / "s32.pth")])
    assert err.rstrip().endswith("these weights fit --backbone vit_small32")
    monkeypatch.delenv("CIL_WEIGHTS", raising=False)
    cpu = ["--method", "seq_lora", "--preset", "cpu", "--dataset", "digits", "--out", str(tmp_path / "runs")]
    err = one_error(capsys, cpu + ["--weights", str(tmp_path / "none.pth")])
    assert "$CIL_WEIGHTS" in err and "--weights" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_error(capsys, ["--method", "seq_lora", "--dataset", "digits", "--device", "cpu", "--weights",
                             str(tmp_path / "none.pth"), "--out", str(tmp_path / "runs")])
    assert "does not exist" in err and "try --preset cpu" in err
    assert not (tmp_path / "runs").exists()  # nothing created by a run that failed its checks


def test_stop_after_and_interrupt_repeat_the_resume_command(tmp_path, monkeypatch, capsys):
    argv = ["--method", "seq_lora", "--preset", "smoke", "--tasks", "2", "--epochs", "1", "--quiet"]
    assert train.main([*argv, "--stop-after", "1", "--out", str(tmp_path / "a")]) == 0
    d = only_run(tmp_path / "a")
    again = f"continue with: {sys.executable} {os.path.join(ROOT, 'train.py')} --resume {d}"
    assert f"stopped after task 1/2 (--stop-after); {again}" in capsys.readouterr().out
    orig = seq_lora.SeqLoRA.loss

    def interrupted(self, x, y):  # Ctrl-C in task 2
        if len(self.heads) == 2:
            raise KeyboardInterrupt
        return orig(self, x, y)

    monkeypatch.setattr(seq_lora.SeqLoRA, "loss", interrupted)
    assert train.main(["--resume", d, "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == f"train.py: interrupted; finished tasks are kept; {again}\n"
    assert len(checkpoint(d)["progress"]["acc"]) == 1
