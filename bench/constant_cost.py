"""Does a method's cost stay flat as tasks accumulate? Evaluation time against the bare backbone, training time
per batch and peak memory at T = 1, 10, 50 tasks, for every method (a benchmark, not a test).

    OMP_NUM_THREADS=2 python bench/constant_cost.py                 # every method, T = 1, 10, 50 (see README)
    python bench/constant_cost.py --methods sd_lora,inflora --T 1,10 --out /tmp/cc.json   # a check
    python bench/constant_cost.py --quick --out /tmp/ccq.json       # tiny ViT, T = 1, 2: seconds (tests)
    python bench/constant_cost.py --table                           # the markdown table of the results file
    OMP_NUM_THREADS=2 python bench/constant_cost.py --train-runs    # whole train.py runs, T = 5, 10, 20, 50
    python bench/constant_cost.py --train-runs --methods seq_lora,c_lora --T 5,10 --out /tmp/ls.json   # a check

Each (method, T) cell runs in its own subprocess (`--child`), so that its peak memory is its own:

  - the backbone (vit_small32, d = 192, depth 6, 32 px; random weights, torch.manual_seed(0)) and a deep copy
    of it before the method touches it: the bare backbone, same weights, same process;
  - the method with its default Config (except `ca_epochs`, see --ca-epochs) for 100 classes, and the
    structure of T tasks of 100 / T classes each, driven through the method contract only, in train.py's
    order: grow, begin_task, optimizer, train(), --build-steps training batches, end_task, eval(). The hooks
    get a data.TaskLoaders of --per-class random images per class (tiny: the cells measure the cost of what
    the method carries after T tasks, not accuracy);
  - at the last task, after --warmup batches, --steps timed training batches of --batch random images with
    the task's labels (loss -> backward -> step; a loss that is a generator is one batch of several optimiser
    steps, all timed); the median s/batch;
  - after its end_task, evaluation as train.py runs it: --rounds interleaved rounds of [bare backbone
    `features(vit, x)`; `method.eval()`, the model `method.merged()` (a linear method's folded inference model,
    built once per evaluation; the method itself otherwise) and its first forward; --repeats more forwards] on
    the same --eval-images random images under torch.no_grad. eval_ratio_to_backbone is the median model
    forward over the median backbone forward (steady state: what every batch of an evaluation after its
    first costs); the first call's extra time (building merged()) is reported beside it;
  - memory on the CPU: peak resident memory over the cell's floor. The floor is the RSS once the imports,
    the two backbones and the images exist and a throwaway copy of the backbone has run one forward, backward
    and optimiser step (the first optimiser step imports torch._dynamo, ~150 MiB, which would otherwise be
    charged to the method). Then the kernel's high-water mark VmHWM is reset to the current RSS (Linux:
    /proc/self/clear_refs) and read at the end: the peak of exactly this process after the floor, over every
    hook, the training steps and the evaluation. Without /proc it falls back to ru_maxrss (which then includes
    everything before the floor). torch has no CPU allocator statistics (its memory statistics are
    CUDA-only), so resident memory it is; glibc may keep freed memory, so RSS is an upper bound of what was
    live. Also reported: the peak of the last task alone (a second reset at its grow) over the RSS then.
    On CUDA also torch.cuda.max_memory_allocated over memory_allocated at the floor (the GPU number is then
    the one the ratio uses);
  - stored parameters after every task, counted as train.py counts them (every tensor of the method's state
    dict minus the backbone's), checked task by task against the method's growth formula (EXPECTED below),
    evaluated with this cell's Config and backbone shape.
A failure is a cell with its error, never the end of the bench.

The default sizes (batch 32, 2 + 8 training batches, 128 evaluation images, 5 rounds of 1 + 1 + 2 forwards,
no new round after ~20 s of evaluation timing once 2 rounds are done, and one steady forward per round
past that, 2 images per class for the hooks, 1 training batch
per earlier task) are chosen so that the whole default bench (8 methods x 3 task counts) takes about 10
minutes on 2 quiet cores: most cells take 10-30 s, of which ~5 s are python, torch and its first optimiser
step; the T = 50 cells spend most of it in the 49 earlier tasks' hooks; cl_lora at T = 50 in its evaluation.
sr2_lora's and cl_lora's first task runs a simpler loss (no relation loss, no KD step), so with three task
counts the file also gives train_step_ratio_T<max>_to_T<middle>, the same code path at both ends.

Per method, the results file (default bench/results/constant_cost.json; with --quick a temporary file) has
eval_ratio_to_backbone (at the largest T), train_step_ratio_T<max>_to_T<min>, peak_memory_ratio_T<max>_to_T<min>
(the peaks over the floor), the stored parameters, the issue's goals with met / missed, and every cell under
"cells". `--table` prints it as markdown, so the numbers in bench/README.md are never typed by hand.

--train-runs (formerly bench/long_sequences.py) measures the same question end to end: every (method, T) cell
is one `python train.py --method M --tasks T --preset cpu --weights random --epochs E --eval-batch-size 256
--device cpu --quiet` in its own process, on CIFAR-100 cut to 10 train and 3 test images per class
(`cifar100_mini.npz` from --data-dir, linked as `cifar100.npz` into a temporary data root; --data full for all
of it). Accuracy is meaningless there; the cells measure the cost of the structure (adapters, heads, buffers,
per-task hooks, evaluation over all seen classes). Peak memory is the child's own peak RSS from
`os.wait4(pid)` (ru_maxrss of exactly that child; `RUSAGE_CHILDREN` would be a maximum over every child, and
`/usr/bin/time -v` is GNU-only), resident CPU memory only, beside a child that only runs `import train` (the
floor). From each run's results.json, per task: stored_params, trainable_params, task_seconds, eval_seconds,
last_acc; per method the stored growth per task g(T) = (S_T - S_1) / (T - 1) is fitted as g = a + b·n
(n = 100 / T classes per task; "constant" means residual 0 over every T) and every per-task count is compared
with EXPECTED. Results: bench/results/long_sequences.json (rewritten after every cell).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import backbone as bb  # noqa: E402
from data import TaskLoaders  # noqa: E402
from methods import METHODS  # noqa: E402

QUICK_VIT = bb.ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)

# The goals (issue 12): (key, bound, methods it applies to: None = all but the listed exceptions)
GOALS = {
    "eval": {"bound": 1.05, "text": "eval <= 1.05x backbone", "skip": {"cl_lora"}, "only": None},
    "train": {"bound": 1.15, "text": "train T_max/T_min <= 1.15", "skip": set(),
              "only": {"sd_lora", "inflora", "sr2_lora"}},
    "memory": {"bound": 1.10, "text": "peak memory T_max/T_min within 10 %", "skip": {"cl_lora"}, "only": None},
}

NUM_CLASSES = 100  # CIFAR-100, for --train-runs
BACKBONE = "vit_small32"
RUNS_OUT = os.path.join(REPO, "bench", "results", "long_sequences.json")  # --train-runs' results file

# ----------------------------------------------------------------------------------------------------
# Expected stored parameters after the tasks of sizes n = [n_0, ..., n_t], as train.py counts them (state
# dict minus the pretrained backbone, buffers included). c: the method's Config, v: the ViTConfig
# (d = v.embed_dim, L = v.depth), N: number of classes. Each entry: (per-task growth in words, where the
# structure is stated, function). The structure comes from each method file's header ("Implements") and its
# adapter classes (the tensors they register); the counts follow from it. Fixed-size buffers allocated in
# __init__ (bases, class statistics, prototype tables) count once and do not grow; the growth per task is the
# "+" part inside the sum. Both modes of this script check their counts against it.


def _sd_rank(c, t):  # sd_lora.py rank_of(t)
    if c.variant != "rr":
        return c.rank
    ranks = [int(s) for s in c.rr_ranks.split(",") if s.strip()]
    return ranks[min(t, len(ranks) - 1)]


def _cl_split(c, v):
    return c.split or v.depth // 2


EXPECTED = {
    # One LoRA (A: r x d, B: d x r) on every target of every block, "never frozen, never expanded" (46,080 at
    # r = 10, q and v, d = 192, L = 6); one Linear head per task, d + 1 per class.
    "seq_lora": ("(d+1)·n_t", "methods/seq_lora.py header: Implements, Deviations (heads sized per task)",
                 lambda c, v, N, n: v.depth * len(c.targets) * 2 * v.embed_dim * c.rank
                 + (v.embed_dim + 1) * sum(n)),
    # Prototypes p_c of every class (SimpleCIL paper: "prototype" classifier, d per class). Implementation: the
    # buffer `protos` (N x d) is allocated up front, plus the n_seen counter, so the stored count is constant.
    "simple_cil": ("0 (N·d prototype table allocated up front; d per class in the paper)",
                   "methods/simple_cil.py header: Implements; buffers protos, n_seen",
                   lambda c, v, N, n: N * v.embed_dim + 1),
    # Per task and adapted block: A_t (r x d, frozen, stored) and B_t per target (d x r, trained) (23,040 + 11,520
    # at r = 10, k and v); a Linear head (d + 1 per class). Fixed: per adapted block the DualGPM basis (d x d,
    # float64) and its width and mode scalars; with --ca the class means and covariances (N·d + N·d²).
    "inflora": ("Lb·(r·d + |targets|·d·r) + (d+1)·n_t",
                "methods/inflora.py header: Implements; Adapter buffers basis, width, mode",
                lambda c, v, N, n: (c.blocks or v.depth) * (v.embed_dim ** 2 + 2)
                + (N * v.embed_dim * (1 + v.embed_dim) if c.ca else 0)
                + sum((c.blocks or v.depth) * (c.rank * v.embed_dim * (1 + len(c.targets))) + (v.embed_dim + 1) * k
                      for k in n)),
    # Per task one component on q and v of every block (A: r_t x d, B: d x r_t, two each: 4·L·d·r_t), its frozen
    # normaliser nu (2 per block), the magnitude alpha_t, the KD offset delta_t and the kept flag (1 + 1 + 1);
    # one Linear head per task (d + 1 per class).
    "sd_lora": ("4·L·d·r_t + 2L + 3 + (d+1)·n_t",
                "methods/sd_lora.py header: Implements; Component buffer nu, Magnitudes alpha, offset, kept",
                lambda c, v, N, n: sum(v.depth * (4 * v.embed_dim * _sd_rank(c, t) + 2) + 3 + (v.embed_dim + 1) * k
                                       for t, k in enumerate(n))),
    # Fixed: in each of the l shared blocks, A_s, B_s and the teacher's B for q and v (l·3·2·d·r). Per task: in
    # each of the L - l specific blocks a q, v LoRA (A, B: 4·d·r) and a 3-vector of block weights (mu), and the
    # prototypes of the task's classes (d per class); the current task's local cosine head (d·n_t + 1) is
    # replaced every task, so it does not grow (23,040 + 9 + 192·n_t at r = 10, d = 192, L = 6).
    "cl_lora": ("(L−l)·(2·2·d·r + 3) + d·n_t",
                "methods/cl_lora.py header: Implements; SharedLoRA, SpecificLoRA",
                lambda c, v, N, n: _cl_split(c, v) * 3 * 2 * v.embed_dim * c.rank
                + sum((v.depth - _cl_split(c, v)) * (4 * v.embed_dim * c.rank + 3) + v.embed_dim * k for k in n)
                + v.embed_dim * n[-1] + 1),
    # Fixed, per adapted matrix: A, B (2·r·d), R_delta and R_old (2·r²); Q_old is not saved ("The adapter's size
    # is fixed ... only the classifier grows"). Head: cosine (d per class, no bias) by default, a Linear (d + 1)
    # otherwise.
    "c_lora": ("0 + d·n_t (cosine head)",
               "methods/c_lora.py header: Implements (the adapter's size is fixed); LoRASite",
               lambda c, v, N, n: v.depth * len(c.targets) * (2 * c.rank * v.embed_dim + 2 * c.rank ** 2)
               + (v.embed_dim + (c.head != "cosine_proto")) * sum(n)),
    # Fixed, per adapted matrix: B (r·d, merged into the backbone and zeroed after each task), the basis Q
    # (d x d, fixed shape) and its width k; A is not saved. A cosine head, d per class.
    "keep_lora": ("0 + d·n_t (cosine head)", "methods/keep_lora.py header: Per task t; Site buffers Q, k",
                  lambda c, v, N, n: v.depth * len(c.targets) * (c.rank * v.embed_dim + v.embed_dim ** 2 + 1)
                  + v.embed_dim * sum(n)),
    # Per task: a LoRA (A, B) on each target of every block (46,080 at r = 10, k and v) and a Linear head (d + 1
    # per class). Fixed: the classifier alignment's class means (N·d, float64) and covariances (N·d²), allocated
    # up front (header: "Fixed ... preallocated fixed-shape buffers").
    "sr2_lora": ("L·|targets|·2·d·r + (d+1)·n_t", "methods/sr2_lora.py header: Implements, Fixed",
                 lambda c, v, N, n: N * v.embed_dim * (1 + v.embed_dim)
                 + sum(v.depth * len(c.targets) * 2 * v.embed_dim * c.rank + (v.embed_dim + 1) * k for k in n)),
}

# ----------------------------------------------------------------------------------------------------
# One cell: a method after T tasks


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def proc_status_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RSS:
    """Peak resident memory above the floor (the RSS when it is built), for the whole cell and the last task.

    Linux: VmHWM reset to the current RSS through /proc/self/clear_refs, so the peak is the one reached after
    the floor; elsewhere ru_maxrss, whose high-water mark then includes everything before the floor.
    """

    def __init__(self):
        self.exact = reset_hwm() and proc_status_mib("VmHWM") is not None
        self.floor = proc_status_mib("VmRSS") if self.exact else rss_peak_mib()
        self.peak_before_last = None
        self.last_start = None

    def peak(self) -> float:
        return proc_status_mib("VmHWM") if self.exact else rss_peak_mib()

    def start_last_task(self) -> None:
        if self.exact:
            self.peak_before_last = self.peak()
            reset_hwm()
            self.last_start = proc_status_mib("VmRSS")

    def report(self) -> dict:
        end = self.peak()
        whole = max(end, self.peak_before_last or 0.0)
        out = {"floor_rss_mib": round(self.floor, 1), "peak_rss_over_floor_mib": round(whole - self.floor, 1),
               "rss_measure": "VmHWM after clear_refs" if self.exact else "ru_maxrss"}
        if self.exact and self.last_start is not None:
            out["last_task_peak_over_start_mib"] = round(end - self.last_start, 1)
        return out


def warm_up(vit, x) -> None:
    """One forward, backward and optimiser step of a throwaway copy on two images, so that what torch loads
    lazily (kernels; the first optimiser step imports torch._dynamo, ~150 MiB of RSS) is part of the floor,
    not of the method's peak."""
    w = copy.deepcopy(vit).train()
    bb.features(w, x).sum().backward()
    for make in (torch.optim.SGD, torch.optim.Adam):
        opt = make(w.parameters(), lr=0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        bb.features(w, x)
    del w, opt


def fake_task(classes, per_class, img, batch, seed) -> TaskLoaders:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(classes) * per_class, 3, img, img, generator=g) * 2 - 1
    y = torch.tensor(list(classes)).repeat_interleave(per_class)
    ds = TensorDataset(x, y)
    return TaskLoaders(train=DataLoader(ds, batch_size=batch, shuffle=True, generator=g),
                       plain=DataLoader(ds, batch_size=batch))


def train_batch(m, opt, sched, x, y) -> int:
    """One training batch as train.py drives it: a tensor is one optimiser step, a generator one per yield."""
    out = m.loss(x, y)
    losses = [out] if isinstance(out, torch.Tensor) else out
    k = 0
    for loss in losses:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        k += 1
    if sched is not None:
        sched.step()
    return k


def stored_count(m, base: int) -> int:
    return sum(v.numel() for v in m.state_dict().values()) - base


def make_config(name: str, args):
    module = METHODS[name]
    cfg = module.Config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    if args.ca_epochs and "ca_epochs" in fields:
        cfg = dataclasses.replace(cfg, ca_epochs=args.ca_epochs)
    return cfg


def run_cell(name: str, T: int, args) -> dict:
    cell = {"method": name, "T": T, "ok": False}
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    v = args.vit_cfg
    t_start = time.time()
    try:
        module = METHODS[name]
        cfg = make_config(name, args)
        cell["config_overrides"] = {k: getattr(cfg, k) for k in ("ca_epochs",)
                                    if hasattr(cfg, k) and getattr(cfg, k) != getattr(module.Config(), k)}
        torch.manual_seed(0)
        vit, _ = bb.create(v, "random")
        bare = copy.deepcopy(vit).to(dev).eval()
        base = sum(t.numel() for t in vit.state_dict().values())
        g = torch.Generator().manual_seed(123)
        x_eval = (torch.rand(args.eval_images, 3, v.img_size, v.img_size, generator=g) * 2 - 1).to(dev)
        x_train = (torch.rand(args.batch, 3, v.img_size, v.img_size, generator=g) * 2 - 1).to(dev)
        warm_up(bare, x_train[:2])
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            cell["floor_gpu_mib"] = round(torch.cuda.memory_allocated(dev) / 2**20, 1)
        mem = RSS()
        m = module.Method(vit, args.num_classes, cfg).to(dev)
        n = args.num_classes // T
        stored, sizes = [], []
        for t in range(T):
            classes = list(range(n * t, n * (t + 1)))
            last = t == T - 1
            data = fake_task(classes, args.per_class, v.img_size, args.batch, seed=t)
            if last:
                mem.start_last_task()
            h0 = time.time()
            m.grow(t, classes)
            m.to(dev)
            m.begin_task(t, classes, data)
            n_batches = args.warmup + args.steps if last else args.build_steps
            opt, sched = m.optimizer(max(n_batches, 1))
            m.train()
            times = []
            if opt is not None:
                y = torch.tensor(classes, device=dev).repeat(-(-args.batch // len(classes)))[: args.batch]
                for i in range(n_batches):
                    if last:
                        xb, yb = x_train, y
                    else:  # the structure tasks: the tiny loader's batches
                        xb, yb = next(iter(data.train))
                        xb, yb = xb.to(dev), yb.to(dev)
                    sync()
                    s0 = time.perf_counter()
                    k = train_batch(m, opt, sched, xb, yb)
                    sync()
                    times.append(time.perf_counter() - s0)
                    cell["optimizer_steps_per_batch"] = k
            if last:
                timed = times[args.warmup:]
                cell["train_s_per_batch"] = round(statistics.median(timed), 5) if timed else None
                cell["train_batch_seconds"] = [round(s, 5) for s in timed]
                cell["trainable_params"] = (0 if opt is None else
                                            sum(p.numel() for gr in opt.param_groups for p in gr["params"]))
            m.end_task(t, classes, data)
            m.eval()
            sync()
            if last:
                cell["last_task_hooks_and_training_s"] = round(time.time() - h0, 3)
            stored.append(stored_count(m, base))
            sizes.append(len(classes))
        cell["build_seconds"] = round(time.time() - t_start, 2)
        cell["stored_params_per_task"] = stored
        cell["stored_params"] = stored[-1]
        check_stored(cell, name, cfg, v, args.num_classes, sizes)
        eval_into(cell, m, bare, x_eval, args, sync)
        cell["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure is a cell of the table, never a crash of the bench
        cell["error"] = f"{type(e).__name__}: {e}"
        cell["traceback"] = traceback.format_exc()[-3000:]
    cell["seconds"] = round(time.time() - t_start, 2)
    cell["peak_rss_mib"] = round(rss_peak_mib(), 1)  # the whole process, imports included
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cell["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 2)  # the whole process, imports included
    if "mem" in locals():
        cell.update(mem.report())
    if cuda:
        cell["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        if "floor_gpu_mib" in cell:
            cell["peak_gpu_over_floor_mib"] = round(cell["peak_gpu_mib"] - cell["floor_gpu_mib"], 1)
    return cell


def eval_into(cell: dict, m, bare, x, args, sync) -> None:
    """Interleaved rounds: bare backbone, then the method (eval(), first call, repeats); medians."""
    back, first, steady = [], [], []
    t0 = time.time()
    with torch.no_grad():
        for r in range(args.rounds):
            sync()
            s0 = time.perf_counter()
            bb.features(bare, x)
            sync()
            back.append(time.perf_counter() - s0)
            m.eval()
            s0 = time.perf_counter()  # as train.py evaluates: merged() built once, then its forward per batch
            model = m.merged() if hasattr(m, "merged") else m
            logits = model(x)
            sync()
            first.append(time.perf_counter() - s0)
            slow = time.time() - t0 > args.eval_budget
            for _ in range(1 if slow else args.repeats):  # past the budget: one steady forward per round
                s0 = time.perf_counter()
                model(x)
                sync()
                steady.append(time.perf_counter() - s0)
            if r + 1 >= args.min_rounds and (slow or time.time() - t0 > args.eval_budget):
                break  # a method whose forward grows with T (cl_lora) is timed over fewer rounds
    C = args.num_classes // cell["T"] * cell["T"]  # every class seen after the last task
    if tuple(logits.shape) != (len(x), C) or not torch.isfinite(logits).all():
        raise AssertionError(f"forward gave logits {tuple(logits.shape)} (finite: "
                             f"{bool(torch.isfinite(logits).all())}), expected ({len(x)}, {C})")
    mb, ms, mf = statistics.median(back), statistics.median(steady), statistics.median(first)
    cell.update({"eval_rounds": len(back), "backbone_eval_s": round(mb, 8), "method_eval_s": round(ms, 8),
                 "method_first_eval_s": round(mf, 8), "eval_ratio_to_backbone": round(ms / mb, 4),
                 "first_eval_ratio_to_backbone": round(mf / mb, 4),
                 "backbone_eval_seconds": [round(s, 8) for s in back],
                 "method_eval_seconds": [round(s, 8) for s in steady],
                 "method_first_eval_seconds": [round(s, 8) for s in first]})


def check_stored(cell: dict, name: str, cfg, v, N: int, sizes: list[int]) -> None:
    words, source, fn = EXPECTED[name]
    exp = [fn(cfg, v, N, sizes[: t + 1]) for t in range(len(sizes))]
    mism = [t for t, (a, b) in enumerate(zip(cell["stored_params_per_task"], exp)) if a != b]
    cell.update({"stored_params_expected": exp[-1], "stored_formula": words, "stored_formula_source": source,
                 "stored_matches_formula": not mism, "first_mismatch_task": mism[0] + 1 if mism else None})


# ----------------------------------------------------------------------------------------------------
# Summary per method, goals


def ratio(a, b):
    return round(a / b, 4) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def goal(kind: str, name: str, value) -> dict:
    g = GOALS[kind]
    if name in g["skip"] or (g["only"] is not None and name not in g["only"]):
        return {"goal": g["text"], "status": "n/a"}
    if value is None:
        return {"goal": g["text"], "status": "not measured"}
    return {"goal": g["text"], "status": "met" if value <= g["bound"] else "missed"}


def summarise(name: str, cells: dict, Ts: list[int]) -> dict:
    ok = {T: c for T, c in cells.items() if c.get("ok")}
    lo, hi = min(Ts), max(Ts)
    c_lo, c_hi = ok.get(lo, {}), ok.get(hi, {})
    mem_key = "peak_gpu_over_floor_mib" if "peak_gpu_over_floor_mib" in c_hi else "peak_rss_over_floor_mib"
    out = {
        "eval_ratio_to_backbone": c_hi.get("eval_ratio_to_backbone"),
        f"train_step_ratio_T{hi}_to_T{lo}": ratio(c_hi.get("train_s_per_batch"), c_lo.get("train_s_per_batch")),
        f"peak_memory_ratio_T{hi}_to_T{lo}": ratio(c_hi.get(mem_key), c_lo.get(mem_key)),
        f"last_task_peak_memory_ratio_T{hi}_to_T{lo}": ratio(c_hi.get("last_task_peak_over_start_mib"),
                                                            c_lo.get("last_task_peak_over_start_mib")),
        f"stored_params_T{hi}": c_hi.get("stored_params"),
        "stored_params_match_formula": (all(c.get("stored_matches_formula") for c in ok.values())
                                        if len(ok) == len(Ts) else None),
        "memory_measure": mem_key,
    }
    if len(Ts) > 2:  # the same code path at both ends (a method's first task may run a simpler loss)
        mid = sorted(Ts)[-2]
        out[f"train_step_ratio_T{hi}_to_T{mid}"] = ratio(c_hi.get("train_s_per_batch"),
                                                        ok.get(mid, {}).get("train_s_per_batch"))
    out["goals"] = {"eval": goal("eval", name, out["eval_ratio_to_backbone"]),
                    "train": goal("train", name, out[f"train_step_ratio_T{hi}_to_T{lo}"]),
                    "memory": goal("memory", name, out[f"peak_memory_ratio_T{hi}_to_T{lo}"])}
    out["errors"] = {str(T): c["error"] for T, c in cells.items() if "error" in c}
    out["cells"] = {str(T): cells[T] for T in sorted(cells)}
    return out


# ----------------------------------------------------------------------------------------------------
# Reporting


def _f(x, fmt="{:.2f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "–"


def table(results: dict) -> str:
    Ts = results["settings"]["T"]
    lo, hi = min(Ts), max(Ts)
    ts = " / ".join(str(T) for T in Ts)
    head = [f"method", f"eval / backbone, T = {ts}", "goal ≤ 1.05", f"train s/batch, T = {ts}",
            f"T{hi} / T{lo}", "goal ≤ 1.15", f"peak MiB over floor, T = {ts}", f"T{hi} / T{lo}", "goal ≤ 1.10",
            f"stored params, T = {hi}", "= formula"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["methods"].items():
        cells = r["cells"]
        mem = r.get("memory_measure", "peak_rss_over_floor_mib")

        def per_T(key, fmt):
            return " / ".join(_f(cells.get(str(T), {}).get(key), fmt) for T in Ts)

        g = r["goals"]
        row = [name, per_T("eval_ratio_to_backbone", "{:.2f}"), g["eval"]["status"],
               per_T("train_s_per_batch", "{:.3f}"), _f(r.get(f"train_step_ratio_T{hi}_to_T{lo}")),
               g["train"]["status"], per_T(mem, "{:.0f}"), _f(r.get(f"peak_memory_ratio_T{hi}_to_T{lo}")),
               g["memory"]["status"], _f(r.get(f"stored_params_T{hi}"), "{:,}"),
               {True: "yes", False: "NO", None: "–"}[r.get("stored_params_match_formula")]]
        if r.get("errors"):
            row[0] += " (failed at T = " + ", ".join(r["errors"]) + ")"
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    s, b, mach = results["settings"], results["backbone"], results["machine"]
    return (f"{b['name']} (d = {b['embed_dim']}, L = {b['depth']}, {b['img_size']} px, random weights), "
            f"{s['num_classes']} classes in T = {', '.join(map(str, s['T']))} tasks; training batch {s['batch']} "
            f"({s['steps']} timed after {s['warmup']}), evaluation {s['eval_images']} images ({s['rounds']} "
            f"rounds x {s['repeats']}), on {mach.get('gpu') or mach.get('cpu')} ({mach['cpu_count']} cores, "
            f"OMP_NUM_THREADS={mach['OMP_NUM_THREADS']}, torch {mach['torch']}); "
            f"{results.get('total_seconds', '?')} s in all")


# ----------------------------------------------------------------------------------------------------
# --train-runs: one cell, a train.py run in its own process


def find_data_dir(given: str) -> str:
    for d in (given, os.environ.get("CIL_DATA", ""), os.path.join(REPO, "..", "shared", "data"),
              os.path.join(REPO, "data")):
        if d and os.path.isfile(os.path.join(d, "cifar100_mini.npz")):
            return os.path.abspath(d)
    sys.exit("constant_cost.py: error: no cifar100_mini.npz under --data-dir, $CIL_DATA, ../shared/data "
             "or ./data")


def run_measured(cmd: list[str], log_dir: str, timeout: float = 0) -> dict:
    """Run cmd (stdout, stderr to log_dir); its exit code, wall seconds and its own peak RSS (os.wait4)."""
    t0 = time.time()
    with open(os.path.join(log_dir, "stdout.log"), "w") as fo, open(os.path.join(log_dir, "stderr.log"), "w") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fo, stderr=fe)
        rusage, status, timed_out = None, 0, False
        while rusage is None:  # os.wait4 gives this child's own rusage; poll so that a timeout can kill it
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rusage = ru
            elif timeout and time.time() - t0 > timeout and not timed_out:
                proc.send_signal(signal.SIGKILL)
                timed_out = True
            else:
                time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_seconds": round(time.time() - t0, 2),
            "peak_rss_mib": round(rusage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}


def run_train(method: str, T: int, args, data_root: str, work: str) -> dict:
    """One `python train.py` run of --train-runs; its row of results/long_sequences.json."""
    out = os.path.join(work, f"{method}__T{T}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--method", method, "--tasks", str(T),
           "--preset", "cpu", "--weights", "random", "--data-root", data_root, "--epochs", str(args.epochs),
           "--eval-batch-size", str(args.eval_batch_size), "--device", "cpu", "--quiet", "--out", out]
    row = {"method": method, "tasks": T, "command": cmd}
    m = run_measured(cmd, out, args.timeout)
    timed_out = m.pop("timed_out")
    row.update(m)
    runs = [d for d in os.listdir(out) if d.startswith("cifar100__")]
    res_path = os.path.join(out, runs[0], "results.json") if runs else ""
    if row["returncode"] != 0 or timed_out or not os.path.isfile(res_path):
        with open(os.path.join(out, "stderr.log")) as f:
            row["error"] = ("timed out; " if timed_out else "") + f.read()[-2000:]
        return row
    with open(res_path) as f:
        res = json.load(f)
    pt = res["per_task"]
    row.update({
        "task_sizes": res["task_sizes"],
        "tasks_done": res["tasks_done"],
        "stored_params": [p["stored_params"] for p in pt],
        "trainable_params": [p["trainable_params"] for p in pt],
        "task_seconds": [p["task_seconds"] for p in pt],
        "eval_seconds": [p["eval_seconds"] for p in pt],
        "steps": [p["steps"] for p in pt],
        "last_acc": res["last_acc"],
        "mean_task_seconds": round(sum(p["task_seconds"] for p in pt) / len(pt), 3),
        "mean_eval_seconds": round(sum(p["eval_seconds"] for p in pt) / len(pt), 3),
    })
    S = row["stored_params"]
    row["stored_growth_per_task"] = (S[-1] - S[0]) / (len(S) - 1) if len(S) > 1 else 0.0
    return row


def expected_row(row: dict, v) -> dict:
    """Expected stored counts after every task, from EXPECTED and the method's default Config."""
    words, source, fn = EXPECTED[row["method"]]
    c, n = METHODS[row["method"]].Config(), row["task_sizes"]
    exp = [fn(c, v, NUM_CLASSES, n[: t + 1]) for t in range(len(row["stored_params"]))]
    mism = [t for t, (a, b) in enumerate(zip(row["stored_params"], exp)) if a != b]
    return {"expected_stored_params": exp,
            "expected_growth_per_task": (exp[-1] - exp[0]) / (len(exp) - 1) if len(exp) > 1 else 0.0,
            "stored_matches_expected": not mism,
            "first_mismatch_task": mism[0] + 1 if mism else None}


def fit_growth(rows: list[dict]) -> tuple[float, float, float] | None:
    """Least squares g = a + b n over the rows (n = classes per task); (a, b, max |residual|)."""
    pts = [(NUM_CLASSES / r["tasks"], r["stored_growth_per_task"]) for r in rows if r["tasks"] > 1]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in pts)


def runs_table(rows: list[dict]) -> str:
    head = ("| method | tasks | peak RSS MiB (over import) | mean s/task | eval s/task | stored params after last "
            "task | stored growth / task (measured) | expected | trainable / task (first / last) | last acc % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['tasks']} | {r['peak_rss_mib']:.0f} | failed (rc "
                         f"{r['returncode']}) | | | | | | |")
            continue
        tr = r["trainable_params"]
        lines.append(
            f"| {r['method']} | {r['tasks']} | {r['peak_rss_mib']:.0f} ({r['peak_rss_over_import_mib']:+.0f}) | "
            f"{r['mean_task_seconds']:.2f} | "
            f"{r['mean_eval_seconds']:.2f} | {r['stored_params'][-1]:,} | {r['stored_growth_per_task']:,.1f} | "
            f"{r['expected_growth_per_task']:,.1f} | {tr[0]:,} / {tr[-1]:,} | {r['last_acc']:.1f} |")
    return "\n".join(lines)


def runs_checks(rows: list[dict], methods: list[str], v) -> list[str]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m and "error" not in r]
        if not rs:
            out.append(f"{m}: no finished run")
            continue
        words, source, fn = EXPECTED[m]
        c = METHODS[m].Config()
        # expected a, b: growth per task is affine in the task size n for equal tasks
        g = [(fn(c, v, NUM_CLASSES, [k, k]) - fn(c, v, NUM_CLASSES, [k])) for k in (0, 1)]
        ea, eb = g[0], g[1] - g[0]
        fit = fit_growth(rs)
        ts = ",".join(str(r["tasks"]) for r in rs)
        if fit is None:
            meas = f"growth {rs[0]['stored_growth_per_task']:,.1f} per task at T={ts} (one T: no fit)"
            const = "n/a"
        else:
            a, b, res = fit
            meas = f"measured growth/task = {a:,.1f} + {b:,.2f}·n_t over T={ts} (max residual {res:.3g})"
            const = ("yes" if res < 1e-6 else "NO") if len(rs) > 2 else "n/a (two T values always fit)"
        exact = all(r["stored_matches_expected"] for r in rs)
        bad = [f"T={r['tasks']} from task {r['first_mismatch_task']}" for r in rs if not r["stored_matches_expected"]]
        same = "yes" if exact else "NO (" + ", ".join(bad) + ")"
        out.append(f"{m}: {meas}; constant across T: {const}; expected {ea:,} + {eb:,}·n_t = {words} "
                   f"[{source}]; every per-task stored count = expected: {same}")
    return out


# ----------------------------------------------------------------------------------------------------
# The bench: one subprocess per cell


def run_child(name: str, T: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="constant_cost_") as tmp:
        out = os.path.join(tmp, "cell.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-T", str(T),
               "--child-out", out] + shape_argv(args)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout or None)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired as e:
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc, err = None, f"{tail}\ntimed out after {args.timeout} s"
        if os.path.isfile(out):
            with open(out) as f:
                return json.load(f)
    return {"method": name, "T": T, "ok": False, "returncode": rc,
            "error": "the child process died (rc %s) before writing its cell: %s" % (
                rc, err.strip().splitlines()[-1][:300] if err and err.strip() else "no stderr"),
            "stderr_tail": (err or "")[-3000:], "seconds": round(time.time() - t0, 2)}


def machine_info(args) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": args.device}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                         timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = "unknown"
    return info


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def default_out(args) -> str:
    if args.train_runs:
        return RUNS_OUT
    if args.quick:
        return os.path.join(tempfile.gettempdir(), "constant_cost_quick.json")
    return os.path.join(REPO, "bench", "results", "constant_cost.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated methods ('': every method of methods.METHODS)")
    p.add_argument("--T", default="", help="comma-separated task counts, divisors of --num-classes "
                   "('': 1,10,50; 1,2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny ViT (d 32, depth 4, 16 px), 10 classes, T = 1, 2, "
                   "few repeats: seconds")
    p.add_argument("--num-classes", type=int, default=0, help="0: 100 (10 with --quick)")
    p.add_argument("--batch", type=int, default=0, help="timed training batch (0: 32; 8 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training batches before the timed ones")
    p.add_argument("--steps", type=int, default=0, help="timed training batches (0: 8; 2 with --quick)")
    p.add_argument("--build-steps", type=int, default=1, help="training batches of each earlier task")
    p.add_argument("--per-class", type=int, default=2, help="random images per class for the hooks' loaders")
    p.add_argument("--eval-images", type=int, default=0, help="evaluation batch (0: 128; 16 with --quick)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved evaluation rounds (0: 5; 2 with --quick)")
    p.add_argument("--min-rounds", type=int, default=2, help="rounds always run, even past --eval-budget")
    p.add_argument("--repeats", type=int, default=0, help="steady-state method forwards per round (0: 2; 1 quick)")
    p.add_argument("--eval-budget", type=float, default=20.0,
                   help="seconds of evaluation timing per cell after which no new round starts (past --min-rounds)")
    p.add_argument("--ca-epochs", type=int, default=1, help="ca_epochs of methods that have it (classifier "
                   "alignment only touches the heads; 1 keeps T = 50 fast); 0 = the method's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before a cell's process is killed (0: none; default 600, none with --train-runs)")
    p.add_argument("--out", default="", help="results file ('': bench/results/constant_cost.json; "
                   "bench/results/long_sequences.json with --train-runs; a temporary file with --quick)")
    r = p.add_argument_group("--train-runs: every cell a whole train.py run on CIFAR-100 (--preset cpu, random "
                             "weights, --device cpu), its peak RSS from os.wait4; T default 5,10,20,50")
    r.add_argument("--train-runs", action="store_true", help="cells are train.py runs (see the module doc)")
    r.add_argument("--epochs", type=int, default=1, help="epochs per task")
    r.add_argument("--data", choices=("mini", "full"), default="mini",
                   help="mini: 10 train / 3 test images per class; full: all of CIFAR-100")
    r.add_argument("--data-dir", default="", help="folder with cifar100_mini.npz / cifar100.npz "
                   "('': $CIL_DATA, else ../shared/data, else ./data)")
    r.add_argument("--eval-batch-size", type=int, default=256)
    r.add_argument("--work-dir", default="", help="where the runs go ('': a temporary folder, removed at the end)")
    r.add_argument("--keep-runs", action="store_true", help="keep the temporary run folders")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-T", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    return p


def resolve(args, p) -> None:
    q = args.quick
    if args.train_runs and (q or args.num_classes not in (0, NUM_CLASSES)):
        p.error(f"--train-runs runs CIFAR-100 ({NUM_CLASSES} classes): no --quick, no --num-classes")
    if args.timeout is None:
        args.timeout = 0 if args.train_runs else 600
    args.vit_cfg = QUICK_VIT if q else bb.PRESETS["vit_small32"]
    args.backbone = "quick (d 32, depth 4, 16 px)" if q else "vit_small32"
    args.num_classes = args.num_classes or (10 if q else 100)
    args.batch = args.batch or (8 if q else 32)
    args.steps = args.steps or (2 if q else 8)
    args.eval_images = args.eval_images or (16 if q else 128)
    args.rounds = args.rounds or (2 if q else 5)
    args.repeats = args.repeats or (1 if q else 2)
    if q:
        args.min_rounds = min(args.min_rounds, args.rounds)
    default_T = {5, 10, 20, 50} if args.train_runs else {1, 2} if q else {1, 10, 50}
    args.Ts = sorted({int(t) for t in args.T.split(",") if t.strip()} or default_T)
    bad = [t for t in args.Ts if t < 1 or args.num_classes % t]
    if bad:
        p.error(f"--T: every task count must divide --num-classes {args.num_classes} (got {bad})")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()] or list(METHODS)
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")


def shape_argv(args) -> list[str]:
    out = ["--num-classes", str(args.num_classes), "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--build-steps", str(args.build_steps), "--per-class", str(args.per_class),
           "--eval-images", str(args.eval_images), "--rounds", str(args.rounds), "--min-rounds",
           str(args.min_rounds), "--repeats", str(args.repeats), "--eval-budget", str(args.eval_budget),
           "--ca-epochs", str(args.ca_epochs), "--device", args.device]
    return out + (["--quick"] if args.quick else [])


# ----------------------------------------------------------------------------------------------------
# --train-runs: every cell a whole `python train.py` run (this was bench/long_sequences.py)


def train_runs(args, p) -> int:
    """The --train-runs grid: methods x T, each one train.py run measured by run_measured; -> exit code."""
    methods, tasks, out = args.method_list, args.Ts, args.out or default_out(args)
    src_dir = find_data_dir(args.data_dir)
    src = os.path.join(src_dir, "cifar100_mini.npz" if args.data == "mini" else "cifar100.npz")
    if not os.path.isfile(src):
        p.error(f"{src} not found")
    v = bb.PRESETS[BACKBONE]

    work = args.work_dir or tempfile.mkdtemp(prefix="cil_long_seq_")
    data_root = os.path.join(work, "data")
    os.makedirs(data_root, exist_ok=True)
    link = os.path.join(data_root, "cifar100.npz")
    if not os.path.exists(link):
        try:
            os.symlink(src, link)
        except OSError:
            shutil.copy(src, link)
    settings = {"methods": methods, "tasks_list": tasks, "epochs": args.epochs, "data": args.data,
                "data_file": src, "preset": "cpu", "backbone": BACKBONE, "weights": "random", "device": "cpu",
                "eval_batch_size": args.eval_batch_size, "method_options": "each method's defaults",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                "git_sha": machine_info(args)["git_sha"], "command": sys.argv,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    # the floor under every cell: a child that only imports train.py (python, torch, numpy, the methods)
    base_dir = os.path.join(work, "import_only")
    os.makedirs(base_dir, exist_ok=True)
    base = run_measured([sys.executable, "-c", "import train"], base_dir)
    settings["import_only_peak_rss_mib"] = base["peak_rss_mib"]
    print(f"{len(methods)} methods x {len(tasks)} task counts, {args.data} data, {args.epochs} epoch(s), "
          f"runs under {work}; a child that only imports train.py peaks at {base['peak_rss_mib']:.0f} MiB",
          flush=True)
    rows, t_start = [], time.time()
    try:
        for T in tasks:  # every method at T before the next T: a cut-short grid is still a complete table
            for m in methods:
                row = run_train(m, T, args, data_root, work)
                row["peak_rss_over_import_mib"] = round(row["peak_rss_mib"] - base["peak_rss_mib"], 1)
                if "error" not in row:
                    row.update(expected_row(row, v))
                rows.append(row)
                err = row.get("error", "").strip()
                status = (f"failed (rc {row['returncode']}): {err.splitlines()[-1][:200] if err else ''}"
                          if "error" in row else
                          f"{row['mean_task_seconds']:.2f} s/task, stored {row['stored_params'][-1]:,}"
                          f"{'' if row['stored_matches_expected'] else ' (differs from expected)'}")
                print(f"[{time.time() - t_start:7.1f} s] {m:11s} T={T:3d}: {row['wall_seconds']:.1f} s wall, "
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB, {status}", flush=True)
                write_json(out, {"settings": settings, "rows": rows, "total_seconds": round(time.time() - t_start, 1)})
    finally:
        if not args.keep_runs and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    lines = runs_checks(rows, methods, v)
    write_json(out, {"settings": settings, "rows": rows, "checks": lines,
                     "total_seconds": round(time.time() - t_start, 1)})
    print()
    print(runs_table(rows))
    print()
    print("Stored-parameter growth per task (n_t: classes per task; d = %d, L = %d):" % (v.embed_dim, v.depth))
    for line in lines:
        print("- " + line)
    print(f"\n{len(rows)} runs in {time.time() - t_start:.0f} s -> {out}")
    return 0 if all("error" not in r for r in rows) else 1



def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.table:
        with open(args.out or default_out(args)) as f:
            results = json.load(f)
        if args.train_runs:
            print(runs_table(results["rows"]) + "\n\n" + "\n".join("- " + c for c in results.get("checks", [])))
        else:
            print(describe(results) + "\n")
            print(table(results))
        return 0
    resolve(args, p)
    if args.train_runs:
        return train_runs(args, p)
    if args.child:
        write_json(args.child_out, run_cell(args.child, args.child_T, args))
        return 0
    out = args.out or default_out(args)
    v = args.vit_cfg
    settings = {k: getattr(args, k) for k in ("num_classes", "batch", "warmup", "steps", "build_steps",
                                              "per_class", "eval_images", "rounds", "min_rounds", "repeats",
                                              "eval_budget", "ca_epochs", "device", "quick")}
    settings.update({"T": args.Ts, "methods": args.method_list, "command": sys.argv,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    results = {"methods": {}, "machine": machine_info(args),
               "backbone": {"name": args.backbone, "weights": "random", **dataclasses.asdict(v)},
               "settings": settings}
    t0 = time.time()
    print(f"{len(args.method_list)} methods x T = {args.Ts} at {args.backbone} on {args.device} -> {out}",
          flush=True)
    for name in args.method_list:
        cells = {}
        for T in args.Ts:
            c = run_child(name, T, args)
            cells[T] = c
            status = ("FAILED: " + c.get("error", "")[:200]) if not c.get("ok") else (
                f"eval {c['eval_ratio_to_backbone']:.2f}x backbone "
                f"(first call {c['first_eval_ratio_to_backbone']:.2f}x), "
                f"train {_f(c.get('train_s_per_batch'), '{:.3f}')} s/batch, peak "
                f"{_f(c.get('peak_gpu_over_floor_mib', c.get('peak_rss_over_floor_mib')), '{:.0f}')} MiB over floor, "
                f"stored {c['stored_params']:,} ({'= formula' if c['stored_matches_formula'] else 'FORMULA MISMATCH'})")
            print(f"[{time.time() - t0:6.1f} s] {name:11s} T={T:3d} ({c.get('seconds', 0):.1f} s): {status}",
                  flush=True)
            results["methods"][name] = summarise(name, cells, args.Ts)
            results["total_seconds"] = round(time.time() - t0, 1)
            write_json(out, results)
        r = results["methods"][name]
        lo, hi = min(args.Ts), max(args.Ts)
        g = r["goals"]
        print(f"  {name}: eval {_f(r['eval_ratio_to_backbone'])}x backbone [{g['eval']['goal']}: "
              f"{g['eval']['status']}]; train T{hi}/T{lo} {_f(r[f'train_step_ratio_T{hi}_to_T{lo}'])} "
              f"[{g['train']['goal']}: {g['train']['status']}]; peak memory T{hi}/T{lo} "
              f"{_f(r[f'peak_memory_ratio_T{hi}_to_T{lo}'])} [{g['memory']['goal']}: {g['memory']['status']}]",
              flush=True)
    print()
    print(describe(results) + "\n")
    print(table(results))
    print(f"\n{len(args.method_list) * len(args.Ts)} cells in {time.time() - t0:.0f} s -> {out}")
    bad = [n for n, r in results["methods"].items() if r["errors"] or r["stored_params_match_formula"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
