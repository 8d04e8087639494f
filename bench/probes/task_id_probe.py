"""Split a finished run's error into task-id confusion and within-task error.

Loads the last checkpoint of a run directory (any method; its options come from the run's config.json) and
scores the test images of every seen class three ways:
    task-agnostic  argmax over all seen classes (what train.py reports)
    within-task    argmax over the classes of the image's own task (an oracle task id)
    task-id        the task of the task-agnostic prediction equals the image's task
plus, per task, how many test images each task's classes win.

    python bench/probes/task_id_probe.py bench/runs/cifar100__cl_lora__s0__... [--data-root ../shared/data] [--json F]

--json F also writes the three accuracies, the images won per task and the per-task rows to F.
"""
from __future__ import annotations

import numpy as np
import torch

from finished_run import open_run, write_json


def main() -> None:
    a, args, _, stream, method, progress = open_run(__doc__)
    k = len(progress["acc"])
    sizes = [len(stream.tasks[j]) for j in range(k)]
    bounds = np.cumsum([0] + sizes)
    task_of = np.repeat(np.arange(k), sizes)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in stream.test_loader(k - 1, 0, 1):
            logits.append(method(x).float())
            labels.append(y)
    z, y = torch.cat(logits).numpy(), torch.cat(labels).numpy()
    pred, ty = z.argmax(1), task_of[y]
    within = np.array([z[i, bounds[ty[i]]:bounds[ty[i] + 1]].argmax() + bounds[ty[i]] for i in range(len(y))])
    print(f"{args.method} after task {k}: {len(y)} test images of {bounds[-1]} classes")
    print(f"task-agnostic acc {100 * (pred == y).mean():.2f}   within-task acc (oracle task id) "
          f"{100 * (within == y).mean():.2f}   task-id acc {100 * (task_of[pred] == ty).mean():.2f}")
    won = np.bincount(task_of[pred], minlength=k)
    print("test images won by each task's classes:", won.tolist(), "of", np.bincount(ty, minlength=k).tolist())
    rows = []
    for j in range(k):
        s = ty == j
        rows.append({"task": j + 1, "task_agnostic": 100 * float((pred[s] == y[s]).mean()),
                     "within_task": 100 * float((within[s] == y[s]).mean()),
                     "task_id": 100 * float((task_of[pred[s]] == j).mean())})
        print(f"  task {j + 1}: task-agnostic {rows[-1]['task_agnostic']:5.1f}  within-task "
              f"{rows[-1]['within_task']:5.1f}  task-id {rows[-1]['task_id']:5.1f}")
    write_json(a.json, {"method": args.method, "tasks": k, "images": int(len(y)),
                        "task_agnostic": 100 * float((pred == y).mean()),
                        "within_task": 100 * float((within == y).mean()),
                        "task_id": 100 * float((task_of[pred] == ty).mean()), "won": won.tolist(), "per_task": rows})


if __name__ == "__main__":
    main()
