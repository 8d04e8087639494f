"""train.py end to end: smoke runs, resume, the checkpoint, the contract's loss generator, and bad input."""
import copy
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import runs
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIL_DATA = os.environ.get("CIL_DATA", "")  # a folder holding cifar100_mini.npz (the test that needs it skips)
TIMING = {"train_seconds", "seconds_per_step", "task_seconds", "eval_seconds"}
SMOKE = ["--preset", "smoke", "--quiet"]


def run_cli(*args, check=True, cwd=ROOT):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


def checkpoint(d):
    return torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)


def check_outputs(d, method):
    """The files of a finished 5-task smoke run and what they hold."""
    assert os.path.basename(d).startswith(f"digits__{method}__s0__")
    r = results(d)
    assert [len(row) for row in r["acc_matrix"]] == [1, 2, 3, 4, 5]
    n_digits_test = len(train.cil_data.load_dataset("digits", "").test)
    assert r["task_sizes"] == [2] * 5 and r["seen_test_samples"][-1] == sum(r["n_test"]) == n_digits_test
    assert r["last_acc"] == pytest.approx(r["curve"][-1]) and 0 <= r["last_acc"] <= 100
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["run"]["method"] == method and cfg["identity"]["class_order"] == train.cil_data.class_order(10, 1993)
    assert sorted(os.listdir(d)) == [".lock", "acc_curve.png", "acc_matrix.csv", "checkpoint.pt", "config.json",
                                     "results.json"]
    ck = checkpoint(d)
    assert ck["progress"]["acc"] == r["acc_matrix"] and ck["identity"] == cfg["identity"]
    # the checkpoint holds the method's own tensors, none of the (unchanged) backbone
    backbone = set(train.bb.create("vit_tiny_test")[0].state_dict())
    assert ck["state"] and not any(runs.backbone_key(k, backbone) for k in ck["state"])
    assert sum(v.numel() for v in ck["state"].values()) == r["per_task"][-1]["stored_params"]
    counts = [p["trainable_params"] for p in r["per_task"]]
    if method == "seq_lora":  # the shared LoRA (q, v of 2 blocks, r = 10, d = 32) plus the current head
        assert counts == [2 * 2 * 2 * 10 * 32 + 2 * 32 + 2] * 5
        assert [p["stored_params"] for p in r["per_task"]] == [2560 + 66 * (t + 1) for t in range(5)]
    else:
        assert counts == [0] * 5


def test_simple_cil_smoke_run_writes_the_outputs(tmp_path):
    assert train.main(["--method", "simple_cil", *SMOKE, "--tasks", "5", "--out", str(tmp_path)]) == 0
    check_outputs(run_dir(tmp_path), "simple_cil")


def test_resume_from_another_directory_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Relative --weights and --out; stopped after 2 of 5 tasks; resumed with the printed command from
    another working directory: the same results and the same checkpoint as the uninterrupted run."""
    (tmp_path / "w").mkdir()
    torch.save(train.bb.create("vit_tiny_test")[0].state_dict(), tmp_path / "w" / "tiny.pth")
    common = ["--method", "seq_lora", *SMOKE, "--tasks", "5", "--epochs", "1", "--weights", "w/tiny.pth"]
    monkeypatch.chdir(tmp_path)
    assert train.main([*common, "--out", "a"]) == 0
    a = run_dir(tmp_path / "a")
    check_outputs(a, "seq_lora")
    capsys.readouterr()
    assert train.main([*common, "--out", "c", "--stop-after", "2"]) == 0
    c = run_dir(tmp_path / "c")
    assert results(c)["tasks_done"] == 2
    (again,) = [ln.split(": ", 1)[1] for ln in capsys.readouterr().out.splitlines()
                if ln.startswith("to continue this run")]
    (tmp_path / "elsewhere").mkdir()
    r = subprocess.run(shlex.split(again) + ["--quiet"], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "resuming after task 2/5" in r.stdout, r.stderr[-2000:]
    assert results(c) == results(a)
    sa, sc = checkpoint(a)["state"], checkpoint(c)["state"]
    assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)
    assert os.listdir(tmp_path / "elsewhere") == []


def test_resume_with_other_workers_equals_the_uninterrupted_run(tmp_path):
    """With random augmentation on, a run whose first task loads with 2 worker processes and whose second,
    resumed, loads in the main process ends as a run that used no workers at all."""
    common = ["--method", "seq_lora", *SMOKE, "--tasks", "2", "--epochs", "2", "--train-aug", "rrc"]
    assert train.main([*common, "--workers", "0", "--out", str(tmp_path / "a")]) == 0
    run_cli(*common, "--workers", "2", "--stop-after", "1", "--out", str(tmp_path / "c"))
    c = run_dir(tmp_path / "c")
    assert train.main(["--resume", c, "--workers", "0", "--quiet"]) == 0
    assert results(c) == results(run_dir(tmp_path / "a"))


def test_one_task_run_has_no_curve_and_never_imports_matplotlib(tmp_path):
    code = ("import sys, train; assert train.main(sys.argv[1:]) == 0; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    p = subprocess.run([sys.executable, "-c", code, "--method", "seq_lora", *SMOKE, "--tasks", "1", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    d = run_dir(tmp_path)
    r = results(d)
    assert r["acc_matrix"][0] and r["last_acc"] == r["avg_inc_acc"] and r["forgetting"] == 0.0
    assert not os.path.exists(os.path.join(d, "acc_curve.png"))  # one point is no curve


def test_method_options_reach_the_config(tmp_path):
    assert train.main(["--method", "seq_lora", *SMOKE, "--tasks", "2", "--rank", "3", "--loss", "full", "--lr",
                       "0.01", "--epochs", "1", "--out", str(tmp_path)]) == 0
    d = run_dir(tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        mc = json.load(f)["method_config"]
    assert (mc["rank"], mc["loss"], mc["lr"], mc["epochs"]) == (3, "full", 0.01, 1)
    assert results(d)["per_task"][0]["trainable_params"] == 2 * 2 * 2 * 3 * 32 + 5 * 33


def test_help_shows_the_values_a_run_uses(capsys, monkeypatch):
    monkeypatch.setenv("CIL_WEIGHTS", "/some/where/v2.pth")
    with pytest.raises(SystemExit):
        train.main(["--method", "seq_lora", "--preset", "cpu", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--rank INT LoRA rank" in out and "(default: /some/where/v2.pth)" in out
    assert "(default: 3; --preset cpu overrides the paper's 20)" in out  # seq_lora's epochs
    assert "(default: vit_small32)" in out and "(default: '')" not in out and "the preset's" not in out


def test_presets_and_their_weights():
    args, _, _ = train.parse(["--method", "sd_lora"])
    assert args.weights == "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # SD-LoRA's code uses the IN-1K tag
    args, cfg, _ = train.parse(["--method", "cl_lora"])
    assert args.weights == "vit_base_patch16_224.augreg_in21k" and args.backbone == "vit_base_patch16_224"
    assert args.workers == min(8, train.cores()) and cfg.epochs == train.METHODS["cl_lora"].Config().epochs
    args, _, _ = train.parse(["--method", "sd_lora", "--weights", "x.pth"])
    assert args.weights == os.path.abspath("x.pth")
    env = os.environ.pop("CIL_WEIGHTS", None)
    try:
        args, cfg, _ = train.parse(["--method", "seq_lora", "--preset", "cpu"])
    finally:
        if env is not None:
            os.environ["CIL_WEIGHTS"] = env
    assert args.weights == os.path.abspath("weights/vit_small32_tin.pth") and (cfg.epochs, cfg.batch_size) == (3, 64)
    args, _, _ = train.parse(["--method", "seq_lora", "--preset", "smoke", "--backbone", "timm:vit_tiny_patch16_224"])
    assert args.backbone == "timm:vit_tiny_patch16_224"  # passed through to backbone.create


# ----------------------------------------------------------------------------------------------------
# The training step: a loss, or a generator of losses (one optimiser step each)


class TwoSteps(nn.Module):
    """A toy method whose loss yields two losses per batch, the second from a fresh forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def optimizer(self, steps_per_epoch):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)

    def loss(self, x, y):
        yield F.cross_entropy(self.lin(x), y)
        yield self.lin(x).pow(2).mean()


class EpochBatches:
    """3 shuffled batches of 20 items, a new order per epoch (set_epoch, as data.ShardedBatches)."""
    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        return iter([perm[i : i + 8] for i in range(0, 20, 8)])

    def __len__(self):
        return 3


def test_a_loss_generator_takes_one_step_per_loss(capsys, monkeypatch):
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    loader = DataLoader(ds, batch_sampler=EpochBatches())
    m, ref = TwoSteps(), TwoSteps()
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)  # a progress line after every batch (stdout is no tty)
    args = train.TrainArgs(method="x", device="cpu", amp="none")
    stats = train.train_task(m, loader, args, 0, 2, train.distributed.Dist())
    opt, sched = ref.optimizer(len(loader))  # by hand
    sums = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        for x, y in loader:
            total = 0.0
            for loss in ref.loss(x, y):
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            sched.step()
            sums.append(total)
    assert (stats["steps"], stats["optimizer_steps"]) == (6, 12)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))
    assert stats["loss"] == pytest.approx(sum(sums[3:]) / 3, rel=1e-6)  # the last epoch's mean batch sum
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  task 1 epoch")]
    assert len(lines) == 6 and lines[-1].startswith("  task 1 epoch 2/2 step 3/3 loss")


# ----------------------------------------------------------------------------------------------------
# The checkpoint: the method's state minus the pristine backbone


def test_checkpoint_state_drops_only_the_unchanged_backbone():
    vit = train.bb.create("vit_tiny_test")[0]
    base = {k: v.clone() for k, v in vit.state_dict().items()}
    method = nn.Module()
    method.vit, method.head = vit, nn.Linear(32, 4)
    method.prev = copy.deepcopy(vit)  # a copy of the backbone (as a KD teacher would be)
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight += 1.0  # merged into the backbone (keep_lora)
    stored = runs.method_state(method.state_dict(), base)
    assert set(stored) == {"vit.blocks.0.attn.qkv.weight", "head.weight", "head.bias"}
    fresh = nn.Module()
    fresh.vit, fresh.head, fresh.prev = train.bb.create("vit_tiny_test")[0], nn.Linear(32, 4), train.bb.create(
        "vit_tiny_test")[0]
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()  # every value must come from the checkpoint or the pristine backbone
    runs.load_method_state(fresh, stored, base)
    sd, want = fresh.state_dict(), method.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)


# ----------------------------------------------------------------------------------------------------
# Warnings and bad input


def test_warnings_paper_preset_on_cpu_and_single_class_tasks(tmp_path, capsys):
    argv = ["--method", "simple_cil", "--preset", "paper", "--backbone", "vit_tiny_test", "--weights", "random",
            "--dataset", "digits", "--tasks", "10", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(e.startswith("train.py: warning: ") for e in err), err
    assert "--preset cpu" in err[0] and "10 of the 10 tasks have a single class" in err[1]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A smoke run stopped after 1 of 2 tasks (simple_cil: no training, seconds)."""
    out = tmp_path_factory.mktemp("stopped")
    assert train.main(["--method", "simple_cil", *SMOKE, "--tasks", "2", "--stop-after", "1", "--out", str(out)]) == 0
    return run_dir(out)


def _edit_config(path, edit):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _npz(path, y_train, y_test):
    import numpy as np
    path.mkdir()
    np.savez(path / "cifar100.npz", x_train=np.zeros((len(y_train), 32, 32, 3), np.uint8), y_train=np.array(y_train),
             x_test=np.zeros((len(y_test), 32, 32, 3), np.uint8), y_test=np.array(y_test))


def _files(tmp, run):
    """Files for a bad-input case under tmp; `run` is a copy of the stopped run."""
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "cifar100.npz").write_bytes(b"\x00" * 100)
    (tmp / "afile").write_text("x")
    (tmp / "ro").mkdir(mode=0o555)
    torch.save(train.bb.create("vit_tiny_test")[0].state_dict(), tmp / "tiny.pth")
    _npz(tmp / "labels_out", list(range(100)) * 2, list(range(100)) + [100])
    _npz(tmp / "class_empty", [c for c in range(100) if c != 7] * 2, list(range(100)))
    for name in ("run", "run_trunc", "run_odd", "run_preset", "run_types", "run_ck", "run_ckodd"):
        shutil.copytree(run, tmp / name)
    (tmp / "run_trunc" / "config.json").write_text('{"run": {"method": "simple_')
    (tmp / "run_odd" / "config.json").write_text("[1, 2]")
    _edit_config(tmp / "run_preset", lambda c: c["run"].update(preset=["gpu"]))
    _edit_config(tmp / "run_types", lambda c: c["run"].update(tasks="two"))
    (tmp / "run_ck" / "checkpoint.pt").write_bytes(b"truncated")
    torch.save({"state": {}}, tmp / "run_ckodd" / "checkpoint.pt")
    for name, text in (("trunc", '{"normalize": {"mean"'), ("list", "[1, 2]"),
                       ("std0", '{"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0, 0.5]}}')):
        (tmp / f"side_{name}").mkdir()
        shutil.copy(tmp / "tiny.pth", tmp / f"side_{name}" / "tiny.pth")
        (tmp / f"side_{name}" / "tiny.json").write_text(text)


S = ["--method", "seq_lora", *SMOKE]
BAD = [
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--method", "seq_lora", "--preset", "gpu"], "invalid choice: 'gpu'"),
    ([*S, "--dataset", "mnist"], "invalid choice"),
    ([*S, "--tasks", "0"], "--tasks must be at least 1"),
    ([*S, "--tasks", "11"], "more than the 10 classes"),
    ([*S, "--tasks", "3"], "equal tasks"),
    ([*S, "--init-cls", "12"], "more than the 10 classes"),
    ([*S, "--increment", "2"], "--increment needs --init-cls"),
    ([*S, "--lr", "-1"], "--lr must be"),
    ([*S, "--rank", "0"], "--rank must be >= 1"),
    ([*S, "--epochs", "-2"], "--epochs must be"),
    ([*S, "--batch-size", "0"], "--batch-size"),
    ([*S, "--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    ([*S, "--device", "gpu"], "--device must be cpu, cuda, cuda:N or mps"),
    ([*S, "--device", "cuda:7"], "no such CUDA device"),
    ([*S, "--workers", "-1"], "--workers must be >= 0"),
    ([*S, "--seed", "-1"], "--seed must be in"),
    ([*S, "--seed", str(2**40)], "--seed must be in"),
    ([*S, "--stop-after", "-1"], "--stop-after must be >= 0"),
    ([*S, "--tasks", "5", "--stop-after", "6"], "more than the run's 5 tasks"),
    ([*S, "--tasks", "x"], "invalid int value"),
    ([*S, "--frobnicate"], "unrecognized arguments"),
    ([*S, "--backbone", "vit_huge"], "--backbone must be one of"),
    ([*S, "--out", "{tmp}/afile"], "is a file"),
    ([*S, "--out", "{tmp}/afile/runs"], "is a file"),
    pytest.param([*S, "--out", "{tmp}/ro/runs"], "cannot write in",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")),
    ([*S, "--dataset", "cifar100", "--data-root", "{tmp}/nowhere"], "three ways"),
    ([*S, "--dataset", "cifar100"], "no_data_dir"),  # $CIL_DATA that does not exist is not created
    ([*S, "--dataset", "cifar100", "NO_CIL_DATA"], "three ways"),  # nor is the default ./data
    ([*S, "--dataset", "cifar100", "--data-root", "{tmp}/corrupt"], "cannot read"),
    ([*S, "--dataset", "cifar100", "--data-root", "{tmp}/labels_out"], "outside [0, 100)"),
    ([*S, "--dataset", "cifar100", "--data-root", "{tmp}/class_empty"], "no training image"),
    ([*S, "--weights", "{tmp}/missing.pth"], "does not exist"),
    ([*S, "--weights", "{tmp}"], "directory"),
    ([*S, "--weights", "{tmp}/side_trunc/tiny.pth"], "tiny.json"),
    ([*S, "--weights", "{tmp}/side_list/tiny.pth"], "tiny.json"),
    ([*S, "--weights", "{tmp}/side_std0/tiny.pth"], "tiny.json"),
    (["--method", "seq_lora", "--preset", "cpu", "--dataset", "digits", "--weights", "{tmp}/tiny.pth"],
     "do not fit the backbone"),
    (["--resume", "{tmp}/no_run"], "not a run directory"),
    (["--resume", "{tmp}/run_trunc"], "config.json is unreadable"),
    (["--resume", "{tmp}/run_odd"], "not a run configuration"),
    (["--resume", "{tmp}/run_preset"], "not a run configuration"),
    (["--resume", "{tmp}/run_types"], "'tasks' must be int"),
    (["--resume", "{tmp}/run_ck"], "checkpoint.pt cannot be read"),
    (["--resume", "{tmp}/run_ckodd"], "checkpoint.pt cannot be read"),
    (["--resume", "{tmp}/run", "--method", "seq_lora"], "the run has method='simple_cil'"),
    (["--resume", "{tmp}/run", "--dataset", "cifar100"], "the run has dataset='digits'"),
    (["--resume", "{tmp}/run", "--tasks", "5"], "the run has tasks=2"),
    (["--resume", "{tmp}/run", "--weights", "{tmp}/tiny.pth"], "--weights give other tensors"),
    (["--resume", "{tmp}/run", "LOCKED"], "in use by another train.py process"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(getattr(b, "values", b)[0])[-40:] for b in BAD])
def test_bad_input_is_one_line_and_creates_nothing(argv, message, stopped_run, tmp_path, capsys, monkeypatch):
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", _offline)  # never download in tests
    _files(tmp_path, stopped_run)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the default ./data and ./runs would appear here
    monkeypatch.setenv("CIL_DATA", str(tmp_path / "no_data_dir"))
    if "NO_CIL_DATA" in argv:
        argv = [a for a in argv if a != "NO_CIL_DATA"]
        monkeypatch.delenv("CIL_DATA")
    held = None
    if "LOCKED" in argv:  # another process holds the run
        argv = [a for a in argv if a != "LOCKED"]
        held = open(tmp_path / "run" / ".lock", "a")
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    before = sorted(os.path.relpath(os.path.join(r, f), tmp_path) for r, ds, fs in os.walk(tmp_path) for f in ds + fs)
    capsys.readouterr()
    try:
        code = train.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    finally:
        if held:
            held.close()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err
    after = sorted(os.path.relpath(os.path.join(r, f), tmp_path) for r, ds, fs in os.walk(tmp_path) for f in ds + fs)
    assert after == before  # no run directory, no data directory, nothing half-written


def _offline(*a, **k):
    raise RuntimeError("offline")


def test_subprocess_error_has_no_traceback(tmp_path):
    p = run_cli("--method", "seq_lora", *SMOKE, "--tasks", "0", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


MINI = os.path.join(CIL_DATA, "cifar100_mini.npz")


@pytest.mark.skipif(not os.path.isfile(MINI), reason="CIL_DATA has no cifar100_mini.npz")
def test_cifar_mini_run_with_small_vit_resumes_with_data_moved(tmp_path, capsys):
    """The cpu preset's pipeline (32 px CIFAR, the small ViT's shape) on the mini split (the .npz file itself as
    --data-root), random weights; the data moved after task 1 and given again on --resume."""
    shutil.copy(MINI, tmp_path / "here.npz")
    run_cli("--method", "seq_lora", "--preset", "cpu", "--weights", "random", "--data-root", str(tmp_path / "here.npz"),
            "--init-cls", "10", "--epochs", "1", "--out", str(tmp_path / "runs"), "--quiet", "--stop-after", "1")
    d = run_dir(tmp_path / "runs")
    os.rename(tmp_path / "here.npz", tmp_path / "there.npz")
    assert train.main(["--resume", d]) == 2  # the run's own (absolute) data root is the default
    assert "here.npz" in capsys.readouterr().err
    assert train.main(["--resume", d, "--data-root", str(tmp_path / "there.npz"), "--quiet", "--stop-after", "2"]) == 0
    r = results(d)
    assert r["n_test"] == [30, 30] and r["tasks_done"] == 2 and all(p["final_loss"] > 0 for p in r["per_task"])


def test_smoke_preset_default_tasks_hold_two_digits_each():
    args, _, _ = train.parse(["--method", "simple_cil", "--preset", "smoke"])
    assert args.tasks == 5  # digits: 10 classes, so 2 a task (a task of one class learns nothing from CE)
