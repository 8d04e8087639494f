"""Are CL-LoRA's old prototypes stale? Score a finished cl_lora run with its prototypes and with fresh ones.

CL-LoRA keeps training the task-shared adapters of the first blocks in every task (under early-exit
distillation), but computes the prototypes of task i's classes once, at the end of task i, and never again
(rehearsal-free: the old images are gone). This probe loads a cl_lora run's last checkpoint and recomputes
every task's prototypes with the final model (branch i, the task's training images, test transforms): an
oracle the method cannot use, which isolates the prototypes' age from everything else. It prints, per task,
the cosine between each class's stored and fresh prototype, and the test images each task's classes win
with the stored and with the fresh prototypes; and the test accuracy both ways.

    python bench/probes/cl_lora_proto_probe.py RUN_DIR [--data-root ../shared/data] [--json F]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from finished_run import open_run, scores, write_json
import metrics  # noqa: E402  (finished_run puts the repository on the path)


@torch.no_grad()
def main() -> None:
    a, _, _, stream, m, progress = open_run(__doc__, methods=("cl_lora",))
    k = len(progress["acc"])
    stored = [getattr(m, f"protos_{i}").clone() for i in range(k)]
    fresh = []
    for i in range(k):  # what end_task computed, with the final shared adapters and branch i
        f, y = zip(*[(m.stacked_branches(m.trunk(x), range(i, i + 1))[0].double(), y)
                     for x, y in stream.task_data(i).plain])
        f, y = torch.cat(f), torch.cat(y) - stream.tasks[i][0]
        fresh.append((f.new_zeros(len(stream.tasks[i]), f.shape[1]).index_add_(0, y, f)
                      / torch.bincount(y, minlength=len(stream.tasks[i]))[:, None]).float())
    cos = [F.cosine_similarity(stored[i], fresh[i], dim=1) for i in range(k)]
    preds = {"stored": [], "fresh": []}
    labels = []
    for x, y in stream.test_loader(k - 1, 0, 1):
        t = m.trunk(x)
        f = m.stacked_branches(t, range(k))  # (k, B, d): f_i(x) of every branch
        for name, protos in (("stored", stored), ("fresh", fresh)):
            z = torch.cat([F.normalize(f[i], dim=1) @ F.normalize(protos[i], dim=1).T for i in range(k)], dim=1)
            preds[name].append(z.argmax(1))
        labels.append(y)
    y = torch.cat(labels)
    task_of = torch.bucketize(torch.arange(m.offsets[-1]), torch.tensor(m.offsets[1:]), right=True)
    run_acc = metrics.accuracy_curve(progress["acc"], progress["n_test"])[-1]
    out = {"method": "cl_lora", "tasks": k, "images": len(y), "run_last_acc": run_acc}
    print(f"cl_lora after task {k}: {len(y)} test images of {m.offsets[-1]} classes (the run's A_T {run_acc:.2f})")
    for name in preds:
        s = out[name] = scores(torch.cat(preds[name]), y, task_of, k)
        print(f"{name:6s} prototypes: acc {s['acc']:5.2f}  task-id acc {s['task_id']:5.2f}  test images won by each "
              f"task's classes {s['won']}")
    out["cos_stored_fresh"] = [float(c.mean()) for c in cos]
    print("cosine of stored and fresh prototypes, mean over each task's classes:",
          " ".join(f"{c:.3f}" for c in out["cos_stored_fresh"]))
    write_json(a.json, out)


if __name__ == "__main__":
    main()
