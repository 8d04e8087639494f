"""Every method at the paper preset's shapes (ViT-B/16, 224 px), on a few random images: does it run, and what
does it cost? A dry run for the first GPU, not an accuracy benchmark.

    OMP_NUM_THREADS=2 python bench/paper_shapes.py               # every variant on the CPU, batch 4 (~10-15 min)
    python bench/paper_shapes.py --methods seq_lora,sd_lora:variant=rr --out /tmp/ps.json   # a check
    python bench/paper_shapes.py --device cuda --batch 128 --steps 20   # peak GPU memory at the paper's batch
    python bench/paper_shapes.py --quick --out /tmp/q.json       # tiny shapes, seconds (tests/test_bench.py)
    python bench/paper_shapes.py --table                         # the markdown table of the results file

A variant is `method` or `method:field=value[:field=value]` (fields of the method's Config, e.g.
`inflora:ca=true`, `sr2_lora:ca=ce`); the default list is every method of methods.METHODS and the main
variants (VARIANTS below). Each variant runs in its own subprocess, so that its peak memory is its own:

  - backbone.create(--backbone, "random"), torch.manual_seed(0); the method with its default Config and
    --num-classes classes (100: CIFAR-100, which sizes the fixed class-statistics buffers);
  - two tasks of --classes-per-task classes (10: CIFAR-100 in 10 tasks), each as train.py drives it: grow,
    begin_task on fake task data (a data.TaskLoaders of --per-class random images per class in [0, 1]:
    `train` shuffled with batch --batch, `plain` in order with batch --eval-batch-size), optimizer, --steps
    training batches (loss -> backward -> step; a loss that is a generator yields one loss per optimiser
    step: backward and step after each yield, the scheduler once per batch), end_task, then one evaluation
    batch through forward (logits over every seen class are checked);
  - peak RSS: the child's own resource.getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux), also taken right
    after the imports (the floor: python, torch, the methods); on CUDA torch.cuda.max_memory_allocated;
  - s/step: mean wall time of the training batches after the first one of the run (CUDA: synchronised);
  - stored parameters after each task, counted as train.py does (every tensor of the method's state dict
    minus the pretrained backbone, buffers included), checked against the method's growth formula
    (EXPECTED below) at the backbone's d and L: "ok" or "mismatch";
  - any error: caught, recorded with its traceback tail, and the bench goes on with the next variant.

The results file (default bench/results/paper_shapes_<device>.json; with --quick a temporary file) is
{"machine": ..., "backbone": ..., "settings": ..., "methods": {variant: row}}, rewritten after every variant;
`--table` prints it as markdown, so the numbers in bench/README.md are never typed by hand.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import backbone as bb  # noqa: E402
from data import TaskLoaders  # noqa: E402
from methods import METHODS  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Variants: every method, and the options that change its structure or its hooks


def default_variants() -> list[str]:
    out = []
    for name, module in METHODS.items():
        out.append(name)
        choices = getattr(module, "CHOICES", {})
        fields = {f.name: f for f in dataclasses.fields(module.Config)}
        if name == "inflora":
            out.append("inflora:ca=true")
        if name == "sd_lora":
            out += [f"sd_lora:variant={v}" for v in choices.get("variant", ()) if v != fields["variant"].default]
        if name == "sr2_lora":
            out.append("sr2_lora:ca=ce")
        if name == "cl_lora" and "kd_update" in fields:  # every mode of the official two-step update
            out += [f"cl_lora:kd_update={v}" for v in choices.get("kd_update", ())
                    if v != fields["kd_update"].default]
    return out


def parse_variant(key: str):
    """'sd_lora:variant=rr' -> (module, Config); ValueError for an unknown method, field or value."""
    name, *items = key.split(":")
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    module = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    over = {}
    for item in items:
        k, sep, v = item.partition("=")
        k = k.replace("-", "_")
        if not sep or k not in fields:
            raise ValueError(f"'{item}' in '{key}' is not field=value with a field of {name}.Config")
        typ = str(fields[k].type)
        if typ == "bool":
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{k} takes true or false (got '{v}')")
            over[k] = v.lower() in ("true", "1")
        else:
            over[k] = {"int": int, "float": float}.get(typ, str)(v)
    return module, dataclasses.replace(module.Config(), **over)


def label(key: str) -> str:
    """'sd_lora:variant=rr' -> 'sd_lora --variant rr' (as on train.py's command line)."""
    name, *items = key.split(":")
    flags = []
    for item in items:
        k, _, v = item.partition("=")
        flag = "--" + k.replace("_", "-")
        flags.append(flag if v.lower() in ("true", "1") else flag.replace("--", "--no-", 1)
                     if v.lower() in ("false", "0") else f"{flag} {v}")
    return " ".join([name] + flags)


# ----------------------------------------------------------------------------------------------------
# Expected stored parameters after tasks of sizes n = [n_0, ..., n_t] (state dict minus the backbone,
# buffers included). c: the method's Config, d: width, L: depth, N: classes. The formulas are those of
# bench/README.md ("Long task sequences") and of each method file's header, made variant-aware; fixed-size
# buffers allocated in __init__ (bases, class statistics, prototype tables) count once.


def _sd_rank(c, t):  # sd_lora's rank of task t: --rank, or the --rr-ranks schedule of -RR
    if c.variant != "rr":
        return c.rank
    ranks = [int(s) for s in c.rr_ranks.split(",") if s.strip()]
    return ranks[min(t, len(ranks) - 1)]


def _ca_stats(N, d):  # class means (N x d) and covariances (N x d x d) of classifier alignment
    return N * d + N * d * d


EXPECTED = {
    # one LoRA (A: r x d, B: d x r) on every target of every block, never expanded; a Linear head per task
    "seq_lora": ("L·|targets|·2·d·r + (d+1)·n_t",
                 lambda c, d, L, N, n: L * len(c.targets) * 2 * d * c.rank + (d + 1) * sum(n)),
    # a prototype table of all N classes allocated up front, plus the n_seen counter: no growth
    "simple_cil": ("N·d + 1 (fixed)", lambda c, d, L, N, n: N * d + 1),
    # per task: A (r x d) and B per target (d x r) in each adapted block, and a Linear head; fixed: the
    # DualGPM basis (d x d), width and mode per block; with --ca the class statistics
    "inflora": ("Lb·(d² + 2) [+ CA N·d·(d+1)] + Σ_t [Lb·r·d·(1+|targets|) + (d+1)·n_t]",
                lambda c, d, L, N, n: (c.blocks or L) * (d * d + 2) + (_ca_stats(N, d) if c.ca else 0)
                + sum((c.blocks or L) * c.rank * d * (1 + len(c.targets)) + (d + 1) * k for k in n)),
    # per task: a q, v component per block (Up d x r_t, Dn r_t x d, two each), the normaliser nu (2 per
    # block), the magnitude alpha, the KD offset and the kept flag; one head grown to C_t rows
    "sd_lora": ("Σ_t [L·(4·d·r_t + 2) + 3 + (d+1)·n_t]",
                lambda c, d, L, N, n: sum(L * (4 * d * _sd_rank(c, t) + 2) + 3 + (d + 1) * k
                                          for t, k in enumerate(n))),
    # fixed: the shared half (Dn, Up and the teacher's Up for q, v in l = L/2 blocks); per task: a q, v
    # LoRA and a 3-vector of block weights in each of the L - l specific blocks, d·n_t prototypes; plus the
    # current task's local cosine head (d·n_t + 1), replaced every task
    "cl_lora": ("l·3·2·d·r + Σ_t [(L−l)·(4·d·r + 3) + d·n_t] + d·n_T + 1",
                lambda c, d, L, N, n: (c.split or L // 2) * 3 * 2 * d * c.rank
                + sum((L - (c.split or L // 2)) * (4 * d * c.rank + 3) + d * k for k in n) + d * n[-1] + 1),
    # fixed: per adapted matrix A, B (2·r·d), R_delta and R_old (2·r²); a cosine head (d per class, or a
    # Linear d+1)
    "c_lora": ("L·|targets|·(2·r·d + 2·r²) + d·n_t",
               lambda c, d, L, N, n: L * len(c.targets) * (2 * c.rank * d + 2 * c.rank ** 2)
               + (d + (c.head != "cosine_proto")) * sum(n)),
    # fixed: per adapted matrix B (r·d, merged and zeroed each task), the basis Q (d x d) and its width;
    # a cosine head, d per class
    "keep_lora": ("L·|targets|·(r·d + d² + 1) + d·n_t",
                  lambda c, d, L, N, n: L * len(c.targets) * (c.rank * d + d * d + 1) + d * sum(n)),
    # per task: a LoRA (A, B) on each target of every block and a Linear head; fixed: the class statistics
    "sr2_lora": ("N·d·(d+1) + Σ_t [L·|targets|·2·d·r + (d+1)·n_t]",
                 lambda c, d, L, N, n: _ca_stats(N, d)
                 + sum(L * len(c.targets) * 2 * d * c.rank + (d + 1) * k for k in n)),
}

# ----------------------------------------------------------------------------------------------------
# One variant


def numel(state: dict) -> int:
    """Elements of a state dict, a tensor registered twice counted once (as train.py counts them)."""
    return sum(n for _, n, _ in {(v.data_ptr(), v.numel(), v.dtype) for v in state.values()})


def fake_task(classes, per_class, img, batch, eval_batch, seed) -> TaskLoaders:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(classes) * per_class, 3, img, img, generator=g)  # the paper preset keeps [0, 1]
    y = torch.tensor(classes).repeat_interleave(per_class)
    ds = TensorDataset(x, y)
    return TaskLoaders(train=DataLoader(ds, batch_size=batch, shuffle=True, generator=g),
                       plain=DataLoader(ds, batch_size=eval_batch))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def train_batch(m, opt, sched, scaler, x, y, amp_ctx) -> tuple[int, float]:
    """One training batch: a tensor loss is one optimiser step, a generator one step per yielded loss."""
    with amp_ctx():
        out = m.loss(x, y)
    losses = [out] if isinstance(out, torch.Tensor) else out
    steps, last = 0, float("nan")
    it = iter(losses)
    while True:
        with amp_ctx():  # a generator's code runs while it is iterated: under the same autocast
            loss = next(it, None)
        if loss is None:
            break
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        steps, last = steps + 1, float(loss.detach())
    if sched is not None:
        sched.step()
    return steps, last


def run_variant(key: str, args) -> dict:
    """Two tasks of `key` at the shapes of `args`; the row of the results file (errors are caught)."""
    row = {"method": key, "label": label(key), "ok": False, "rss_after_import_mib": round(rss_mib(), 1)}
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def amp_ctx():
        return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)

    times, stored, trainable, hooks = [], [], [], []
    t_start = time.time()
    try:
        module, cfg = parse_variant(key)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        torch.manual_seed(0)
        vit, _ = bb.create(args.backbone_cfg, "random")
        base = numel(vit.state_dict())
        m = module.Method(vit, args.num_classes, cfg).to(dev)
        n_t = args.classes_per_task
        for t in range(2):
            classes = list(range(n_t * t, n_t * (t + 1)))
            data = fake_task(classes, args.per_class, args.backbone_cfg.img_size, args.batch, args.eval_batch_size,
                             seed=t)
            h0 = time.time()
            m.grow(t, classes)
            m.to(dev)
            m.begin_task(t, classes, data)
            sync()
            h_begin = time.time() - h0
            opt, sched = m.optimizer(len(data.train))
            scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")
            trainable.append(0 if opt is None else sum(p.numel() for g in opt.param_groups for p in g["params"]))
            m.train()
            if opt is not None:
                for x, y in itertools.islice(itertools.chain.from_iterable(itertools.repeat(data.train)),
                                             args.steps):  # cycles the loader
                    sync()
                    s0 = time.time()
                    k, last = train_batch(m, opt, sched, scaler, x.to(dev), y.to(dev), amp_ctx)
                    sync()
                    times.append(time.time() - s0)
                    row["optimizer_steps_per_batch"] = k
                    row["last_loss"] = last
            h0 = time.time()
            m.end_task(t, classes, data)
            sync()
            h_end = time.time() - h0
            m.eval()
            x, _ = next(iter(data.plain))
            with torch.no_grad(), amp_ctx():
                logits = m(x[: args.batch].to(dev))
            C = n_t * (t + 1)
            if tuple(logits.shape) != (min(args.batch, len(x)), C):
                raise AssertionError(f"forward gave logits {tuple(logits.shape)} after task {t + 1}, "
                                     f"expected ({min(args.batch, len(x))}, {C})")
            if not torch.isfinite(logits.float()).all():
                raise FloatingPointError(f"forward gave non-finite logits after task {t + 1}")
            stored.append(numel(m.state_dict()) - base)
            hooks.append({"begin_task_s": round(h_begin, 3), "end_task_s": round(h_end, 3)})
        row["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table, never a crash of the bench
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-3000:]
    row["seconds"] = round(time.time() - t_start, 2)
    row["peak_rss_mib"] = round(rss_mib(), 1)
    if cuda:
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        row["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
    row["step_seconds"] = [round(s, 4) for s in times]
    row["s_per_step"] = round(sum(times[1:]) / len(times[1:]), 4) if len(times) > 1 else None
    row["hooks"] = hooks
    row["trainable_params"] = trainable
    row["stored_params_per_task"] = stored
    row["stored_params"] = stored[-1] if len(stored) == 2 else None
    if "error" not in row or stored:
        try:
            expected_into(row, key, args)
        except Exception as e:  # noqa: BLE001
            row["stored_check"] = f"no formula ({type(e).__name__}: {e})"
    return row


def expected_into(row: dict, key: str, args) -> None:
    module, cfg = parse_variant(key)
    name = key.split(":")[0]
    words, fn = EXPECTED[name]
    v = args.backbone_cfg
    n = [args.classes_per_task] * 2
    exp = [fn(cfg, v.embed_dim, v.depth, args.num_classes, n[: t + 1]) for t in range(2)]
    row["stored_params_expected"] = exp[-1]
    row["stored_params_expected_per_task"] = exp
    row["stored_formula"] = words
    got = row["stored_params_per_task"]
    if not got:
        row["stored_check"] = "not reached"
    elif got != exp[: len(got)]:
        row["stored_check"] = "mismatch"
    else:
        row["stored_check"] = "ok" if len(got) == len(exp) else f"ok for task {len(got)} only"


# ----------------------------------------------------------------------------------------------------
# The bench: one subprocess per variant


def run_child(key: str, args, argv_shapes: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="paper_shapes_") as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", key, "--child-out", out] + argv_shapes
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
    return {"method": key, "label": label(key), "ok": False, "returncode": rc,
            "error": f"the child process {'died (rc %s)' % rc if rc is not None else 'was killed'} before writing "
                     "its row: " + (err.strip().splitlines()[-1][:300] if err and err.strip() else "no stderr"),
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
        info["cuda"] = torch.version.cuda
    return info


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Reporting


def table(results: dict) -> str:
    """The markdown table of a results file (what bench/README.md shows)."""
    rows = results["methods"]
    gpu = any("peak_gpu_mib" in r for r in rows.values())
    head = ["method", "ran", "peak RSS MiB (after import)"] + (["peak GPU MiB"] if gpu else []) + \
           ["s/step", "stored params after 2 tasks", "expected", "check", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in rows.items():
        rss = f"{r['peak_rss_mib']:.0f} ({r['rss_after_import_mib']:.0f})" if r.get("peak_rss_mib") else ""
        sps = f"{r['s_per_step']:.3f}" if r.get("s_per_step") is not None else ""
        stored = f"{r['stored_params']:,}" if r.get("stored_params") is not None else ""
        exp = f"{r['stored_params_expected']:,}" if r.get("stored_params_expected") is not None else ""
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:120]
        cells = [f"`{r.get('label', label(key))}`", "ok" if r.get("ok") else "FAILED", rss] + \
                ([f"{r['peak_gpu_mib']:,.0f}" if r.get("peak_gpu_mib") is not None else ""] if gpu else []) + \
                [sps, stored, exp, r.get("stored_check", ""), err]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    s, b, mach = results["settings"], results["backbone"], results["machine"]
    return (f"{b['name']} (d = {b['embed_dim']}, L = {b['depth']}, {b['img_size']} px, random weights), "
            f"{s['num_classes']} classes, 2 tasks of {s['classes_per_task']} classes x {s['per_class']} images, "
            f"batch {s['batch']}, {s['steps']} steps per task, amp {s['amp']}, on {mach.get('gpu') or mach.get('cpu')}"
            f" ({mach['cpu_count']} cores, torch {mach['torch']}); {results.get('total_seconds', '?')} s in all")


def default_out(args) -> str:
    if args.quick:
        return os.path.join(tempfile.gettempdir(), "paper_shapes_quick.json")
    dev = args.device.split(":")[0]
    sub = "gpu" if dev == "cuda" else ""
    return os.path.join(REPO, "bench", "results", sub, f"paper_shapes_{dev}.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated variants (method or method:field=value); "
                   "'' = every method and the main variants")
    p.add_argument("--steps", type=int, default=0, help="training batches per task (0: 2 on cpu, 20 on cuda)")
    p.add_argument("--batch", type=int, default=0, help="training batch (0: 4 on cpu, 128 on cuda, 4 with --quick)")
    p.add_argument("--eval-batch-size", type=int, default=0, help="batch of the plain loader of the hooks "
                   "(0: = --batch on cpu, 256 on cuda as train.py)")
    p.add_argument("--per-class", type=int, default=0, help="random images per class and task "
                   "(0: 2 on cpu, enough for two training batches on cuda)")
    p.add_argument("--classes-per-task", type=int, default=0, help="0: 10 (CIFAR-100 in 10 tasks), 2 with --quick")
    p.add_argument("--num-classes", type=int, default=0,
                   help="classes the method is built for (0: 100, 10 with --quick)")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="a backbone.py preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast of loss and forward (the paper preset: none)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a 32-wide, 4-block ViT at 16 px): seconds")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process (fast; the peak RSS is then cumulative, not per method)")
    p.add_argument("--jobs", type=int, default=1, help="variants run at once, each in its own process (1 for "
                   "timing; more only to fit a time budget: peak memory stays per process, s/step does not)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a variant's process is killed (0: none)")
    p.add_argument("--out", default="", help="results file ('': bench/results/paper_shapes_<device>.json, "
                   "bench/results/gpu/ on cuda, a temporary file with --quick)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    return p


def resolve(args) -> None:
    """Fill the 0 defaults from the device and --quick; args.backbone_cfg is the ViTConfig."""
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.backbone_cfg = bb.ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
        args.backbone = "quick (d 32, depth 4, 16 px)"
    else:
        if args.backbone not in bb.PRESETS:
            raise SystemExit(f"paper_shapes.py: error: unknown backbone '{args.backbone}'")
        args.backbone_cfg = bb.PRESETS[args.backbone]
    args.batch = args.batch or (128 if cuda and not args.quick else 4)
    args.steps = args.steps or (20 if cuda and not args.quick else 2)
    args.eval_batch_size = args.eval_batch_size or (256 if cuda and not args.quick else args.batch)
    args.classes_per_task = args.classes_per_task or (2 if args.quick else 10)
    args.num_classes = args.num_classes or (10 if args.quick else 100)
    args.per_class = args.per_class or (max(2, -(-2 * args.batch // args.classes_per_task)) if cuda else 2)
    if 2 * args.classes_per_task > args.num_classes:
        raise SystemExit("paper_shapes.py: error: two tasks need 2 x --classes-per-task <= --num-classes")


def shape_argv(args) -> list[str]:
    """The resolved shape options, for the child processes."""
    out = ["--steps", str(args.steps), "--batch", str(args.batch), "--eval-batch-size", str(args.eval_batch_size),
           "--per-class", str(args.per_class), "--classes-per-task", str(args.classes_per_task),
           "--num-classes", str(args.num_classes), "--device", args.device, "--amp", args.amp]
    return out + (["--quick"] if args.quick else ["--backbone", args.backbone])


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.table:
        path = args.out or default_out(args)
        if not os.path.isfile(path):
            p.error(f"no results file {path}: run the bench first (or pass --out FILE)")
        with open(path) as f:
            results = json.load(f)
        print(describe(results) + "\n")
        print(table(results))
        return 0
    resolve(args)
    if args.child:  # one variant, in its own process
        write_json(args.child_out, run_variant(args.child, args))
        return 0
    keys = [k.strip() for k in args.methods.split(",") if k.strip()] or default_variants()
    for k in keys:
        try:
            parse_variant(k)
        except (ValueError, TypeError) as e:
            p.error(str(e))
    out = args.out or default_out(args)
    v = args.backbone_cfg
    results = {"machine": machine_info(args),
               "backbone": {"name": args.backbone, "weights": "random", **dataclasses.asdict(v)},
               "settings": {"batch": args.batch, "steps": args.steps, "eval_batch_size": args.eval_batch_size,
                            "per_class": args.per_class, "classes_per_task": args.classes_per_task,
                            "num_classes": args.num_classes, "tasks": 2, "amp": args.amp,
                            "in_process": args.in_process, "jobs": args.jobs, "git_sha": git_sha(), "command": sys.argv,
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
               "methods": {}}
    t0 = time.time()
    print(f"{len(keys)} variants at {args.backbone} (d {v.embed_dim}, L {v.depth}, {v.img_size} px), batch "
          f"{args.batch}, {args.steps} steps x 2 tasks on {args.device} -> {out}", flush=True)
    def report(k, row):
        results["methods"][k] = row
        results["methods"] = {q: results["methods"][q] for q in keys if q in results["methods"]}  # in order
        results["total_seconds"] = round(time.time() - t0, 1)
        write_json(out, results)
        gpu = f", GPU {row['peak_gpu_mib']:,.0f} MiB" if row.get("peak_gpu_mib") is not None else ""
        status = "ok" if row.get("ok") else f"FAILED: {row.get('error', '')[:200]}"
        sps = f"{row['s_per_step']:.3f} s/step" if row.get("s_per_step") is not None else "no training"
        print(f"[{time.time() - t0:6.1f} s] {label(k):28s} {status}; peak RSS {row.get('peak_rss_mib') or 0:.0f} "
              f"MiB{gpu}, {sps}, stored {row.get('stored_params')} (expected {row.get('stored_params_expected')}:"
              f" {row.get('stored_check', '-')})", flush=True)

    if args.in_process:
        for k in keys:
            report(k, run_variant(k, args))
    else:  # --jobs > 1: concurrent children (peaks stay per process; s/step then shares the machine)
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {pool.submit(run_child, k, args, shape_argv(args)): k for k in keys}
            for f in concurrent.futures.as_completed(futures):
                report(futures[f], f.result())
    print()
    print(table(results))
    print(f"\n{len(keys)} variants in {time.time() - t0:.0f} s -> {out}")
    bad = [k for k, r in results["methods"].items() if not r.get("ok") or r.get("stored_check") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
