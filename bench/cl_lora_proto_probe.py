"""Are CL-LoRA's old prototypes stale? Score a finished cl_lora run with its prototypes and with fresh ones.

CL-LoRA keeps training the task-shared adapters of the first blocks in every task (under early-exit
distillation), but computes the prototypes of task i's classes once, at the end of task i, and never again
(rehearsal-free: the old images are gone). This probe loads a cl_lora run's last checkpoint and recomputes
every task's prototypes with the final model (branch i, the task's training images, test transforms): an
oracle the method cannot use, which isolates the prototypes' age from everything else. It prints, per task,
the cosine between each class's stored and fresh prototype, and the test images each task's classes win
with the stored and with the fresh prototypes; and the test accuracy both ways.

    python bench/cl_lora_proto_probe.py RUN_DIR [--data-root ../shared/data] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402
import methods.cl_lora as cl  # noqa: E402


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args()
    args, cfg, saved = train.parse(["--resume", a.run_dir] + (["--data-root", a.data_root] if a.data_root else []))
    assert args.method == "cl_lora", f"{a.run_dir} is a {args.method} run, not cl_lora"
    stream, m, _, _, _, progress = train.setup(args, cfg, saved)  # rebuilds the finished tasks, loads the state
    k = len(progress["acc"])
    m.eval()
    stored = [getattr(m, f"protos_{i}").clone() for i in range(k)]
    fresh = []
    for i in range(k):  # what end_task computed, with the final shared adapters and branch i
        for s in m.specific:
            s.active = i
        fresh.append(cl.class_means(m.vit, stream.task_data(i).plain, stream.tasks[i]))
    for s in m.specific:
        s.active = m.task
    cos = [F.cosine_similarity(stored[i], fresh[i], dim=1) for i in range(k)]
    preds = {"stored": [], "fresh": []}
    labels = []
    for x, y in stream.test_loader(k - 1, 0, 1):
        t = m.trunk(x)
        f = torch.stack([m.branch(t, i) for i in range(k)])  # (k, B, d): f_i(x) of every branch
        for name, protos in (("stored", stored), ("fresh", fresh)):
            z = torch.cat([F.normalize(f[i], dim=1) @ F.normalize(protos[i], dim=1).T for i in range(k)], dim=1)
            preds[name].append(z.argmax(1))
        labels.append(y)
    y = torch.cat(labels)
    offs = torch.tensor(m.offsets[1:])
    task_of = lambda c: torch.bucketize(c, offs, right=True)  # noqa: E731
    run_acc = train.accuracy_curve(progress["acc"], progress["n_test"])[-1]
    out = {"method": "cl_lora", "tasks": k, "images": len(y), "run_last_acc": run_acc}
    print(f"cl_lora after task {k}: {len(y)} test images of {m.offsets[-1]} classes (the run's A_T {run_acc:.2f})")
    for name in preds:
        pred = torch.cat(preds[name])
        won = torch.bincount(task_of(pred), minlength=k).tolist()
        acc = 100 * (pred == y).float().mean().item()
        task_id = 100 * (task_of(pred) == task_of(y)).float().mean().item()
        out[name] = {"acc": acc, "task_id": task_id, "won": won}
        print(f"{name:6s} prototypes: acc {acc:5.2f}  task-id acc {task_id:5.2f}  test images won by each task's "
              f"classes {won}")
    out["cos_stored_fresh"] = [float(c.mean()) for c in cos]
    print("cosine of stored and fresh prototypes, mean over each task's classes:",
          " ".join(f"{c:.3f}" for c in out["cos_stored_fresh"]))
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
