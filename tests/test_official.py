"""Each method's official per-dataset settings: they resolve through `--preset paper --dataset NAME`, under
both protocols, and the options they set do what the official code does."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from backbone import create
from methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_DATASETS = ("cifar100", "imagenet_r", "imagenet_a", "cub", "domainnet")


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
@pytest.mark.parametrize("method", list(METHODS))
def test_official_settings_resolve(method, dataset, tmp_path):
    official = getattr(METHODS[method], "OFFICIAL", {}).get(dataset)
    args, cfg, _ = train.parse(["--method", method, "--dataset", dataset, "--out", str(tmp_path)])
    assert (args.dataset, args.protocol) == (dataset, "official")
    defaults = METHODS[method].Config()
    for k, v in (official or {}).items():  # every key is a run option or a Config field, and takes effect
        assert k in train.OPTIONS or hasattr(cfg, k), k
        assert (getattr(args, k) if k in train.OPTIONS else getattr(cfg, k)) == v, k
    for f in dataclasses.fields(cfg):  # nothing else moves from the Config defaults
        if f.name not in (official or {}):
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    if official is None:  # no official config: the CIFAR-100 Config values and the default split and order
        assert (args.tasks, args.order_seed, args.natural_order) == (10, 1993, False)
    common, ccfg, _ = train.parse(["--method", method, "--dataset", dataset, "--protocol", "common",
                                   "--out", str(tmp_path)])
    assert (common.protocol, common.tasks, common.order_seed, common.natural_order) == ("common", 10, 1993, False)
    assert ccfg == cfg and common.weights == args.weights  # the method's own hyperparameters and backbone
    flags = ["--tasks", "5", "--order-seed", "7", "--epochs", "2"]  # the command line wins over the settings
    given, gcfg, _ = train.parse(["--method", method, "--dataset", dataset, "--out", str(tmp_path), *flags])
    assert (given.tasks, given.order_seed, gcfg.epochs) == (5, 7, 2)


def test_the_settings_are_the_official_configs():
    """A few values read against the configs by hand, so that a moved entry fails here."""
    sd, cl, inf = (METHODS[m].OFFICIAL for m in ("sd_lora", "cl_lora", "inflora"))
    assert sd["imagenet_r"]["order_seed"] == 1995 and sd["imagenet_a"]["later_lr"] == 5e-3
    assert cl["cifar100"] == dict(tasks=20, order_seed=1993, rank=8) and cl["imagenet_r"]["tasks"] == 40
    assert all(v["natural_order"] for v in inf.values()) and inf["imagenet_r"]["epochs"] == 50
    assert "cub" not in sd and "cub" not in cl and "imagenet_a" not in inf
    assert not any(hasattr(METHODS[m], "OFFICIAL") for m in ("c_lora", "keep_lora", "sr2_lora"))  # none published


def test_help_shows_the_official_values(capsys, tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--method", "cl_lora", "--dataset", "imagenet_r", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.05: official imagenet_r setting (Config: 0.03))" in out
    assert "(default: 40)" in out and "(default: vit_base_patch16_224.augreg_in21k_ft_in1k)" in out


def test_protocol_official_is_the_paper_presets(tmp_path):
    with pytest.raises(train.UsageError, match="--protocol official is for --preset paper"):
        train.parse(["--method", "seq_lora", "--preset", "smoke", "--protocol", "official", "--out", str(tmp_path)])
    args, _, _ = train.parse(["--method", "seq_lora", "--preset", "smoke", "--out", str(tmp_path)])
    assert args.protocol == "common"


def test_a_dataset_without_official_config_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--method", "sd_lora", "--dataset", "cub",
                        "--data-root", str(tmp_path), "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[0] == ("train.py: note: sd_lora has no official config for cub: it runs with "
                                              "its CIFAR-100 settings")
    assert "prepare.py cub" in lines[1]  # then the missing tree, with the command that makes it


def test_sd_lora_later_lr_is_the_lr_of_every_task_after_the_first():
    m = METHODS["sd_lora"]
    method = m.Method(create("vit_tiny_test", "random")[0], 4, m.Config(lr=1e-2, later_lr=5e-3, milestones="10,15",
                                                                          lr_decay=0.05))
    lrs = []
    for t in range(2):
        method.grow(t, [2 * t, 2 * t + 1])
        opt, sched = method.optimizer(steps_per_epoch=1)
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(15):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1] * 0.05 ** 2)  # after epochs 10 and 15
    assert lrs == [1e-2, 5e-3]


def test_inflora_sgd_trains_the_head_at_its_own_lr():
    m = METHODS["inflora"]
    method = m.Method(create("vit_tiny_test", "random")[0], 4, m.Config(optimizer="sgd", lr=0.005, head_lr=0.01, rank=2))
    method.grow(0, [0, 1])
    opt, sched = method.optimizer(steps_per_epoch=2)
    assert isinstance(opt, torch.optim.SGD) and [g["lr"] for g in opt.param_groups] == [0.005, 0.01]
    head = {id(p) for p in method.heads[-1].parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head
    assert not head & {id(p) for p in opt.param_groups[0]["params"]}
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"]) and opt.param_groups[0]["params"]
    for _ in range(8):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0005, 0.001])  # x 0.1 from epoch 4


def test_a_run_made_before_the_per_dataset_settings_resumes(tmp_path):
    """config.json without 'protocol' and without the Config fields added with it: the common protocol and the
    defaults, which are what such a run did."""
    argv = ["--method", "sd_lora", "--preset", "smoke", "--tasks", "2", "--epochs", "1", "--quiet",
            "--out", str(tmp_path)]
    assert train.main(argv + ["--stop-after", "1"]) == 0
    (run,) = os.listdir(tmp_path)
    path = os.path.join(tmp_path, run, "config.json")
    config = json.load(open(path))
    del config["run"]["protocol"], config["method_config"]["later_lr"]
    json.dump(config, open(path, "w"))
    assert train.main(["--resume", os.path.join(tmp_path, run), "--quiet"]) == 0
    assert len(json.load(open(os.path.join(tmp_path, run, "results.json")))["acc_matrix"]) == 2
