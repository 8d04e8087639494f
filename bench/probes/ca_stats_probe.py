"""Why InfLoRA's classifier alignment favours the newest tasks: re-run a run's alignment, one change at a time.

On the `cpu` preset `inflora --ca` forgets more than inflora without it: after the last task its heads of the
newest tasks win far more than their share of the test images. Its alignment (inflora_ca1.py) differs from
sr2_lora --ca ce's, which does not show the bias, in three things: (a) each old class's stored mean is shrunk
by gamma_c = 0.9 + 0.1 (t_c + 1)/(t + 1) before sampling, (b) the logits are divided by tau = 0.1 times the mean
per-task logit norm, and (c) the backbones differ, so the class statistics stored at their task may have gone
stale by different amounts. This probe loads a run directory with an alignment (inflora --ca, or sr2_lora with
any --ca but none) and, from the checkpoint's (already aligned) heads, runs the method's own `align_heads`
again after the last task: for inflora with each of (a), (b) turned off; for both with the stored statistics
replaced by fresh ones (every seen class's mean and covariance with the final backbone, the method's own
class_statistics on its training images with test transforms: an oracle the method cannot have). For each it
prints the accuracy on the seen test classes, the task-id accuracy and the test images each task's heads win;
and, per task, how far the stored means are from the fresh ones.

    python bench/probes/ca_stats_probe.py RUN_DIR [--data-root ../shared/data] [--json F] [--threads N]
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.nn.functional as F

from finished_run import open_run, scores, write_json
from backbone import features  # noqa: E402  (finished_run puts the repository on the path)
import methods.inflora as inflora  # noqa: E402
import methods.sr2_lora as sr2  # noqa: E402

VARIANTS = {  # method -> {name: (InfLoRA's mean decay on, its logit norm on, fresh statistics)}
    "inflora": {"as the run (decay, norm, stored)": (True, True, False),
                "no mean decay": (False, True, False),
                "no logit norm": (True, False, False),
                "neither (sr2's --ca ce rule)": (False, False, False),
                "fresh statistics": (True, True, True),
                "fresh statistics, neither": (False, False, True)},
    "sr2_lora": {"as the run (stored)": (False, False, False),
                 "fresh statistics": (False, False, True)},
}


def drift(stored: torch.Tensor, fresh: torch.Tensor, task_of: torch.Tensor, k: int) -> list[dict]:
    """Per task: mean cosine of stored and fresh class means, and mean ||stored - fresh|| / ||fresh||."""
    cos = F.cosine_similarity(stored, fresh, dim=1)
    rel = (stored - fresh).norm(dim=1) / fresh.norm(dim=1)
    return [{"cos": cos[task_of == j].mean().item(), "rel_shift": rel[task_of == j].mean().item()} for j in range(k)]


def main() -> None:
    a, args, cfg, stream, m, progress = open_run(__doc__)
    if args.method not in VARIANTS or cfg.ca in (False, "none"):
        sys.exit(f"error: {a.run_dir} is not an inflora --ca or sr2_lora --ca run")
    mod = {"inflora": inflora, "sr2_lora": sr2}[args.method]
    k = len(progress["acc"])
    if k < 2:
        sys.exit(f"error: {a.run_dir} has finished {k} task; the alignment runs from task 2 on")
    vit = m.merged().vit
    sizes = [len(stream.tasks[j]) for j in range(k)]
    task_of = torch.arange(k).repeat_interleave(torch.tensor(sizes))
    with torch.no_grad():
        batches = [(features(vit, x), y) for x, y in stream.test_loader(k - 1, 0, 1)]  # every class seen so far
    f, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    stats = [mod.class_statistics(vit, stream.task_data(j).plain, stream.tasks[j]) for j in range(k)]
    fresh_mean, fresh_cov = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats]).float()
    n = sum(sizes)  # labels are positions in the class order: task j owns a contiguous block, as the buffers
    assert [c for j in range(k) for c in stream.tasks[j]] == list(range(n))
    stored_mean, stored_cov = m.ca_mean[:n].clone(), m.ca_cov[:n].clone()
    out = {"run_dir": a.run_dir, "tasks": k, "images": len(y),
           "drift": drift(stored_mean.float(), fresh_mean.float(), task_of, k)}

    def report(tag: str) -> dict:
        with torch.no_grad():
            s = scores(m.logits(f).argmax(1), y, task_of, k)
        print(f"{tag:34s} acc {s['acc']:5.2f}  task-id acc {s['task_id']:5.2f}  test images won by each task's "
              f"heads {s['won']}")
        return s

    print(f"{a.run_dir}: after task {k}, {len(y)} test images of {n} classes")
    out["checkpoint"] = report("checkpoint (aligned in the run)")
    heads, decay = copy.deepcopy(m.heads.state_dict()), inflora.mean_decay
    out["variants"] = {}
    try:
        for tag, (use_decay, use_norm, use_fresh) in VARIANTS[args.method].items():
            m.heads.load_state_dict(heads)
            if args.method == "inflora":  # align_heads looks mean_decay up at call time
                inflora.mean_decay = decay if use_decay else (lambda task_of, t: torch.ones_like(task_of).double())
                m.cfg = dataclasses.replace(cfg, ca_logit_norm=cfg.ca_logit_norm if use_norm else 0.0)
            m.ca_mean[:n], m.ca_cov[:n] = (fresh_mean, fresh_cov) if use_fresh else (stored_mean, stored_cov)
            torch.manual_seed(0)
            m.align_heads(k - 1)
            out["variants"][tag] = report(tag)
    finally:
        inflora.mean_decay, m.cfg = decay, cfg
        m.ca_mean[:n], m.ca_cov[:n] = stored_mean, stored_cov
    print("stored vs fresh class means, per task: cos " +
          " ".join(f"{d['cos']:.3f}" for d in out["drift"]) + "; ||stored - fresh|| / ||fresh|| " +
          " ".join(f"{d['rel_shift']:.3f}" for d in out["drift"]))
    write_json(a.json, out)


if __name__ == "__main__":
    main()
