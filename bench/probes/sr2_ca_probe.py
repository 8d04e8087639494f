"""Why SR²-LoRA's classifier alignment collapses on the `cpu` preset: re-run the alignment from a checkpoint.

Loads the checkpoint of an sr2_lora run directory (e.g. a `cpu`-preset run stopped with `--stop-after 7`), then,
from the checkpoint's (already aligned) heads, runs the alignment again with three losses: SR²'s (entropy +
logit-normalised CE, the official default), the logit-normalised CE alone, and plain CE (the official `vanilla`
base, SLCA). For each it prints the accuracy on the seen test classes, the accuracy on fresh Gaussian replay from
the stored statistics (what the alignment fits), and how many test images each task's head wins.

    python bench/probes/sr2_ca_probe.py RUN_DIR     # --data-root / --weights only if they have moved since the run
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from finished_run import open_run
from backbone import features  # noqa: E402  (finished_run puts the repository on the path)
import methods.sr2_lora as sr2  # noqa: E402


def main() -> None:
    a, _, cfg, stream, m, progress = open_run(__doc__, methods=("sr2_lora",), weights=True, json_out=False)
    k = len(progress["acc"])
    with torch.no_grad():
        batches = [(features(m.vit, x), y) for x, y in stream.test_loader(k - 1, 0, 1)]  # every class seen so far
    f, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    offs = torch.tensor(m.offsets[1:])
    n_seen = m.offsets[-1]
    eye = torch.eye(f.shape[1], dtype=torch.float64)
    chol = torch.linalg.cholesky(m.ca_cov[:n_seen].double() + cfg.ca_shrink * eye).float()

    def report(tag: str) -> None:
        with torch.no_grad():
            pred = m.logits(f).argmax(1)
            torch.manual_seed(1)
            g, _ = sr2.gaussian_replay(m.ca_mean[:n_seen].float(), chol, 100)
            replay = (m.logits(g).argmax(1) == torch.arange(n_seen).repeat_interleave(100)).float().mean()
        wins = torch.bincount(torch.bucketize(pred, offs, right=True), minlength=k).tolist()
        print(f"{tag:32s} test acc {100 * (pred == y).float().mean():5.2f}  replay acc {100 * replay:5.2f}  "
              f"test images won by each task's head {wins}")

    print(f"{a.run_dir}: after task {k}, {len(y)} test images of {n_seen} classes")
    report("checkpoint (aligned in the run)")
    heads = copy.deepcopy(m.heads.state_dict())
    losses = {
        "SR² loss (entropy + norm. CE)": sr2.alignment_loss,
        "normalised CE only": lambda z, t, tau: F.cross_entropy(z / (tau * (z.norm(dim=-1, keepdim=True) + 1e-7)), t),
        "plain CE (vanilla / SLCA)": lambda z, t, tau: F.cross_entropy(z, t),
    }
    original = sr2.alignment_loss
    try:
        for tag, loss in losses.items():
            m.heads.load_state_dict(heads)
            sr2.alignment_loss = loss  # align_heads looks the loss up at call time
            torch.manual_seed(0)
            m.align_heads(k - 1)
            report(tag)
    finally:
        sr2.alignment_loss = original


if __name__ == "__main__":
    main()
