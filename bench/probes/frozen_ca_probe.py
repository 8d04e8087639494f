"""Does training the backbone help once the classifier is the same? SR²-LoRA's classifier on the frozen backbone.

sr2_lora --ca ce beats SimpleCIL on the `cpu` preset, but it differs from SimpleCIL in two things: its backbone
trains (one LoRA branch per task) and its classifier is a linear head per task, re-aligned after every task on
Gaussian replay of the stored class means and covariances. This probe keeps the second and drops the first: it
builds the sr2_lora method of the given preset on the pretrained backbone and never trains a LoRA branch. Per
task t it
    1. grows the method (a new head h_t; the new branch keeps B = 0, so the backbone stays the pretrained one),
    2. trains h_t alone with the preset's optimiser, schedule, batch size and epochs, on the task's local CE,
    3. stores each new class's feature mean and covariance and, for t >= 1, runs the method's own alignment
       (`align_heads`) with each loss asked for,
    4. scores the seen classes' test images (a_t, task-id accuracy, images won by each task's head).
Since the backbone never moves, every image's feature is computed once (test transforms), which makes the probe
cheap (a few minutes on 2 cores). The one difference from a run: step 2 trains on those clean features, while a
run's head sees augmented images (RandomResizedCrop + flip). The statistics of step 3 use the same clean
features and the same formula as the method's end_task.

    python bench/probes/frozen_ca_probe.py --data-root ../shared/data [--seed 0] [--ca ce sr2] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train  # noqa: E402
from backbone import features  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "..", "..", "..", "shared", "weights", "vit_small32_tin.pth")  # beside the repository


@torch.no_grad()
def encode(vit, loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [(features(vit, x), y) for x, y in loader]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def statistics(f: torch.Tensor, y: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and unbiased covariance (float64) of every class of `classes` from precomputed features: what
    sr2_lora's class_statistics computes from the images."""
    means, covs = [], []
    for c in classes:
        fc = f[y == c].double()
        mu = fc.mean(0)
        means.append(mu)
        covs.append((fc - mu).T @ (fc - mu) / max(len(fc) - 1, 1))
    return torch.stack(means), torch.stack(covs)


def train_head(m, t: int, f: torch.Tensor, y: torch.Tensor, cfg, gen: torch.Generator) -> None:
    """Step 2: h_t on the local CE, with the optimiser and per-step schedule the method builds for a task."""
    steps = -(-len(y) // cfg.batch_size)
    opt, sched = m.optimizer(steps)  # its parameters: h_t and the new branch (which gets no gradient here)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps):
            b = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(m.heads[t](f[b]), y[b] - m.offsets[-2])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def run(ca: str, a, cache: dict) -> dict:
    """One probe run with alignment loss `ca`; `cache` keeps the frozen features between runs."""
    argv = ["--method", "sr2_lora", "--preset", a.preset, "--tasks", str(a.tasks), "--seed", str(a.seed),
            "--weights", a.weights, "--ca", ca] + (["--data-root", a.data_root] if a.data_root else [])
    args, cfg, _ = train.parse(argv)
    stream, m, _, _, _, _ = train.setup(args, cfg)  # writes nothing
    m.eval()
    T = len(stream.sizes)
    if "test" not in cache:
        cache["test"] = encode(m.vit, stream.test_loader(T - 1, 0, 1))  # every class's test images
    f_test, y_test = cache["test"]
    curve = []
    for t in range(T):
        classes = stream.tasks[t]
        train.seed_everything(train.task_seed(args.seed, t))
        if t not in cache:
            cache[t] = encode(m.vit, stream.task_data(t).plain)
        f, y = cache[t]
        m.grow(t, classes)
        train_head(m, t, f, y, cfg, torch.Generator().manual_seed(train.task_seed(args.seed, t)))
        mean, cov = statistics(f, y, classes)  # step 3, as end_task
        m.ca_mean[classes] = mean
        m.ca_cov[classes] = cov.float()
        if t >= 1:
            m.align_heads(t)
        seen = y_test < m.offsets[-1]
        with torch.no_grad():
            pred = m.logits(f_test[seen]).argmax(1)
        curve.append(100 * (pred == y_test[seen]).float().mean().item())
        task_of = torch.bucketize(torch.arange(m.offsets[-1]), torch.tensor(m.offsets[1:]), right=True)
        task_id = 100 * (task_of[pred] == task_of[y_test[seen]]).float().mean().item()
        won = torch.bincount(task_of[pred], minlength=t + 1).tolist()
        print(f"  --ca {ca} task {t + 1}/{T}: acc {curve[-1]:.2f}  task-id {task_id:.2f}", flush=True)
    return {"curve": curve, "last_acc": curve[-1], "avg_inc_acc": sum(curve) / len(curve), "task_id": task_id,
            "won": won}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--weights", default=WEIGHTS)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ca", nargs="+", default=["ce", "sr2"], choices=["ce", "sr2"])
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"preset": a.preset, "tasks": a.tasks, "seed": a.seed, "weights": os.path.basename(a.weights),
           "runs": {}}
    cache: dict = {}
    for ca in a.ca:
        try:
            r = out["runs"][ca] = run(ca, a, cache)
        except train.UsageError as e:
            sys.exit(f"frozen_ca_probe.py: {e}")
        print(f"frozen backbone + sr2_lora heads, --ca {ca}: A_T {r['last_acc']:.2f}  avg. inc. "
              f"{r['avg_inc_acc']:.2f}  task-id {r['task_id']:.2f}  images won by each task's head {r['won']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
