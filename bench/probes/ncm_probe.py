"""Is it the representation or the classifier? Score a finished run's final features with fresh class means.

Loads a run's last checkpoint (any method that evaluates through a folded backbone copy, `merged()`: all but
cl_lora and simple_cil), computes the mean feature of every seen class with the final backbone on all of its
training images (test transforms), and classifies the test images by cosine to those means (nearest class
mean, SimpleCIL's rule). The means use every task's images: an oracle the rehearsal-free methods cannot use.
If the means do much better than the run's own classifier, the final features still tell the classes apart
and what failed is the classifier (old heads that no longer fit the moved features, or a recency bias);
if they do not, the representation itself forgot.

    python bench/probes/ncm_probe.py RUN_DIR [--data-root ../shared/data] [--json F] [--threads N]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from finished_run import open_run, scores, write_json
from backbone import features  # noqa: E402  (finished_run puts the repository on the path)


@torch.no_grad()
def main() -> None:
    a, args, _, stream, m, progress = open_run(__doc__)
    if not hasattr(m, "merged"):
        sys.exit(f"error: {args.method} does not evaluate through a folded backbone (it has no merged())")
    k = len(progress["acc"])
    vit = m.merged().vit
    sizes = [len(stream.tasks[j]) for j in range(k)]
    n_seen = sum(sizes)
    task_of = torch.arange(k).repeat_interleave(torch.tensor(sizes))
    sums, counts = None, torch.zeros(n_seen, dtype=torch.float64)
    for j in range(k):
        for x, y in stream.task_data(j).plain:
            f = features(vit, x).double()
            sums = torch.zeros(n_seen, f.shape[1], dtype=torch.float64) if sums is None else sums
            sums.index_add_(0, y, f)
            counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
    means = F.normalize((sums / counts[:, None]).float(), dim=1)
    run_pred, ncm_pred, labels = [], [], []
    for x, y in stream.test_loader(k - 1, 0, 1):
        f = features(vit, x)
        run_pred.append(m(x).argmax(1))
        ncm_pred.append((F.normalize(f.float(), dim=1) @ means.T).argmax(1))
        labels.append(y)
    y = torch.cat(labels)
    out = {"method": args.method, "tasks": k, "images": len(y),
           "run": scores(torch.cat(run_pred), y, task_of, k), "ncm": scores(torch.cat(ncm_pred), y, task_of, k)}
    print(f"{args.method} after task {k}: {len(y)} test images of {n_seen} classes")
    for name, tag in (("run", "the run's classifier"), ("ncm", "fresh class means")):
        s = out[name]
        print(f"{tag:22s} acc {s['acc']:5.2f}  task-id acc {s['task_id']:5.2f}  test images won by each task's "
              f"classes {s['won']}")
    write_json(a.json, out)


if __name__ == "__main__":
    main()
