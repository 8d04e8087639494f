"""bench/probes/frozen_ca_probe.py: its statistics are sr2_lora's, and a smoke run keeps the backbone frozen."""
import json
import os
import subprocess
import sys

import torch

from conftest import synthetic_task, tiny_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench", "probes"))

import frozen_ca_probe as fcp  # noqa: E402
import methods.sr2_lora as sr2  # noqa: E402
from backbone import features  # noqa: E402


def test_statistics_from_features_equal_the_methods_from_images():
    vit = tiny_vit()
    classes = [3, 4, 5]
    data = synthetic_task(classes, n_per_class=7)
    f, y = fcp.encode(vit, data.plain)
    mean, cov = fcp.statistics(f, y, classes)
    ref_mean, ref_cov = sr2.class_statistics(vit, data.plain, classes)
    assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(cov, ref_cov, atol=1e-6)


def test_smoke_run_aligns_only_from_the_second_task_and_never_moves_the_backbone(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "probes", "frozen_ca_probe.py"), "--preset",
                        "smoke", "--weights", "random", "--tasks", "2", "--ca", "ce", "sr2", "--json", str(out),
                        "--threads", "1"], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    ce, s2 = runs["ce"], runs["sr2"]
    assert len(ce["curve"]) == len(s2["curve"]) == 2
    assert ce["curve"][0] == s2["curve"][0]  # task 1: the same head, no alignment yet
    assert ce["curve"][1:] != s2["curve"][1:]  # the losses differ from task 2 on
    assert sum(ce["won"]) == sum(s2["won"]) > 0
    assert ce["avg_inc_acc"] == sum(ce["curve"]) / 2
    assert list(tmp_path.iterdir()) == [out]  # nothing but the json is written


def test_the_probes_model_stays_the_pretrained_backbone():
    args, cfg, _ = fcp.train.parse(["--method", "sr2_lora", "--preset", "smoke", "--weights", "random",
                                    "--tasks", "2", "--ca", "ce"])
    stream, m, _, _, _, _ = fcp.train.setup(args, cfg)
    m.eval()
    x = next(iter(stream.test_loader(0)))[0][:4]
    before = features(m.vit, x)
    m.grow(0, stream.tasks[0])
    head = m.heads[0].weight.detach().clone()
    f, y = fcp.encode(m.vit, stream.task_data(0).plain)
    fcp.train_head(m, 0, f, y, cfg, torch.Generator().manual_seed(0))
    assert not torch.equal(m.heads[0].weight, head)  # the head trained
    assert torch.equal(features(m.vit, x), before)  # the new branch has B = 0 and gets no gradient
    assert all(b.abs().sum() == 0 for ad in m.adapters for br in ad.branches for b in br.B.values())
