"""How much of the first task's input does InfLoRA's memory protect? The official criterion against the paper's.

InfLoRA designs each new branch's A_t off the subspace its memory stores, so a later branch leaves an old
input x unchanged only as far as x lies in that subspace: B_t A_t x = B_t A_t (I - P P^T) x. After task 1 the
memory keeps the top singular directions of the block input's statistic M = (1/n) sum x x^T until their
energy reaches eps_0 (0.95): the official code sums sigma(H)^4 (the squared singular values of M), the paper
sigma(H)^2 (those of M itself), and on a spectrum that falls off, the fourth power reaches eps_0 with fewer
directions. This probe loads a finished inflora run, rebuilds its task-1 model exactly (every later branch's B
set to zero; the branches only add), computes M on task 1's training images per block with the method's own
`input_moments`, and prints per block: the directions each criterion keeps (the method's own `memory_update`),
and the fraction of task 1's input energy, trace(P^T M P) / trace(M), inside each, and inside the memory the
run ended with. What a basis misses is what later branches are free to change.

    python bench/probes/inflora_memory_probe.py RUN_DIR [--data-root ../shared/data] [--json F] [--threads N]
"""
from __future__ import annotations

import torch

from finished_run import open_run, write_json
import methods.inflora as inflora  # noqa: E402  (finished_run puts the repository on the path)


def captured(M: torch.Tensor, P: torch.Tensor, mode: int) -> float:
    """Fraction of trace(M) in the stored space: span(P) ('remove', mode 0) or its complement ('retain', 1)."""
    inside = torch.trace(P.T @ M @ P) / torch.trace(M)
    return float(1 - inside if mode else inside)


@torch.no_grad()
def main() -> None:
    a, _, cfg, stream, m, progress = open_run(__doc__, methods=("inflora",))
    final = [(ad.stored().clone(), int(ad.mode)) for ad in m.adapters]
    for ad in m.adapters:  # the task-1 model: the branches of tasks 2.. add nothing
        for B in list(ad.B)[1:]:
            for b in B.values():
                b.zero_()
    moments = m.input_moments(stream.task_data(0).train)  # what end_task of task 1 computed
    eps = inflora.threshold(0, m.T, cfg.lamb, cfg.lame)
    empty = torch.zeros(moments[0].shape[0], 0, dtype=torch.float64)
    out = {"run_dir": a.run_dir, "tasks": len(progress["acc"]), "eps_0": eps, "blocks": []}
    for M, (P_end, mode_end) in zip(moments, final):
        row = {"d": M.shape[0], "captured_final_memory": captured(M, P_end, mode_end)}
        for name, power in (("code", 4), ("paper", 2)):
            P, mode = inflora.memory_update(M, empty, 0, eps, power, first=True, dual=m.dual)
            kept = M.shape[0] - P.shape[1] if mode else P.shape[1]
            row[name] = {"directions": kept, "captured": captured(M, P, mode)}
        out["blocks"].append(row)
    print(f"{a.run_dir}: task 1's block inputs, eps_0 {eps:.3f}; per block: directions kept / task-1 input energy "
          f"inside")
    for i, b in enumerate(out["blocks"]):
        print(f"  block {i}: official (sigma^4) {b['code']['directions']:3d} / {100 * b['code']['captured']:5.1f} %   "
              f"paper (sigma^2) {b['paper']['directions']:3d} / {100 * b['paper']['captured']:5.1f} %   "
              f"the run's final memory {100 * b['captured_final_memory']:5.1f} %")
    write_json(a.json, out)


if __name__ == "__main__":
    main()
