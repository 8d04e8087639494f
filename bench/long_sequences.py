"""Peak memory and seconds per task against the number of tasks, for every method (a benchmark, not a test).

    OMP_NUM_THREADS=2 python bench/long_sequences.py                   # the default grid, ~30-45 min on 2 cores
    python bench/long_sequences.py --methods seq_lora,c_lora --tasks-list 5,10 --out /tmp/ls.json   # a check
    python bench/long_sequences.py --data full --epochs 1 --tasks-list 5,10   # real CIFAR-100 (hours on a CPU)

Every (method, T) cell is one `python train.py --method M --tasks T --preset cpu --weights random --epochs E
--eval-batch-size 256 --device cpu --quiet` in its own subprocess, so that its peak memory is its own. The
default data is CIFAR-100 cut to 10 train and 3 test images per class (`cifar100_mini.npz` from --data-dir,
linked as `cifar100.npz` into a temporary data root), the small ViT (vit_small32: d = 192, depth 6, 32 px,
fp32) with random weights, 1 epoch per task: the numbers measure the cost of the *structure* (adapters,
heads, buffers, per-task hooks and evaluation over all seen classes), not accuracy, which is meaningless
here. With 2 classes per task at T = 50 every task is one training step, so s/task is dominated by the
hooks (begin_task / end_task passes, SVDs, classifier alignment) and grows with what the method carries.

Peak memory: the child's own peak RSS from `os.wait4(pid)`, which returns the rusage of exactly that child
(ru_maxrss: KiB on Linux, bytes on macOS). Chosen over the two alternatives because
`getrusage(RUSAGE_CHILDREN)` is a maximum over every child ever reaped (not per child, and not
delta-able); `/usr/bin/time -v` is GNU-only (BSD/macOS `time` takes `-l` and prints another format) and its
text must be parsed; a Python launcher that calls train.main and prints its own ru_maxrss changes the
measured process and needs a side channel for the number. os.wait4 needs nothing but a POSIX kernel and
measures the unmodified `python train.py` process (train.py's own children, `git rev-parse`, are reaped by
it and tiny). It is resident CPU memory only; GPU memory is not measured (the cells run with --device cpu).
A child that only runs `import train` is measured first: with a CUDA build of torch, importing it alone
takes ~0.6 GiB, so the table also gives each cell's peak above that floor.

From each run's results.json, per task: stored_params (train.py: every tensor of the method's state dict
minus the pretrained backbone, buffers included), trainable_params, task_seconds (grow + begin_task +
training + end_task), eval_seconds, and last_acc. Everything goes to --out (JSON, rewritten after every
cell) and a markdown table is printed. Then, per method:
  - a formula-free check: the measured stored growth per task, g(T) = (S_T - S_1) / (T - 1), is fitted as
    g = a + b * n with n = 100 / T classes per task; a is the per-task growth of the adapters, b the growth
    per class (head rows, prototypes). "constant" means the fit is exact over every T (residual 0);
  - the expected stored count after every task from the method's growth formula (EXPECTED below, evaluated
    with the backbone shape and each method's default Config), compared task by task with the measured one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import backbone as bb  # noqa: E402
from methods import METHODS  # noqa: E402

NUM_CLASSES = 100  # CIFAR-100
BACKBONE = "vit_small32"

# ----------------------------------------------------------------------------------------------------
# Expected stored parameters after the tasks of sizes n = [n_0, ..., n_t], as train.py counts them (state
# dict minus the pretrained backbone, buffers included). c: the method's Config, v: the ViTConfig
# (d = v.embed_dim, L = v.depth), N: number of classes. Each entry: (per-task growth in words, where the
# structure is stated, function). The structure comes from each method file's header ("Implements") and its
# adapter classes (the tensors they register); the counts follow from it. Fixed-size buffers allocated in
# __init__ (bases, class statistics, prototype tables) count once and do not grow; the growth per task is the
# "+" part inside the sum. bench/constant_cost.py imports EXPECTED.


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
# One cell


def find_data_dir(given: str) -> str:
    for d in (given, os.environ.get("CIL_DATA", ""), os.path.join(REPO, "..", "shared", "data"),
              os.path.join(REPO, "data")):
        if d and os.path.isfile(os.path.join(d, "cifar100_mini.npz")):
            return os.path.abspath(d)
    sys.exit("long_sequences.py: error: no cifar100_mini.npz under --data-dir, $CIL_DATA, ../shared/data "
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


def run_cell(method: str, T: int, args, data_root: str, work: str) -> dict:
    out = os.path.join(work, f"{method}__T{T}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--method", method, "--tasks", str(T),
           "--preset", "cpu", "--weights", "random", "--data-root", data_root, "--epochs", str(args.epochs),
           "--eval-batch-size", str(args.eval_batch_size), "--device", "cpu", "--quiet", "--out", out]
    row = {"method": method, "tasks": T, "command": cmd}
    m = run_measured(cmd, out, args.cell_timeout)
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


# ----------------------------------------------------------------------------------------------------
# Reporting


def table(rows: list[dict]) -> str:
    head = ("| method | tasks | peak RSS MiB (over import) | mean s/task | eval s/task | stored params after last task | "
            "stored growth / task (measured) | expected | trainable / task (first / last) | last acc % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['tasks']} | {r['peak_rss_mib']:.0f} | failed (rc {r['returncode']}) "
                         "| | | | | | |")
            continue
        tr = r["trainable_params"]
        lines.append(
            f"| {r['method']} | {r['tasks']} | {r['peak_rss_mib']:.0f} ({r['peak_rss_over_import_mib']:+.0f}) | "
            f"{r['mean_task_seconds']:.2f} | "
            f"{r['mean_eval_seconds']:.2f} | {r['stored_params'][-1]:,} | {r['stored_growth_per_task']:,.1f} | "
            f"{r['expected_growth_per_task']:,.1f} | {tr[0]:,} / {tr[-1]:,} | {r['last_acc']:.1f} |")
    return "\n".join(lines)


def checks(rows: list[dict], methods: list[str], v) -> list[str]:
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
        out.append(f"{m}: {meas}; constant across T: {const}; expected {ea:,} + {eb:,}·n_t = {words} "
                   f"[{source}]; every per-task stored count = expected: {'yes' if exact else 'NO (' + ', '.join(bad) + ')'}")
    return out


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--tasks-list", default="5,10,20,50", help="comma-separated task counts (divisors of 100)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per task")
    p.add_argument("--data", choices=("mini", "full"), default="mini",
                   help="mini: 10 train / 3 test images per class; full: all of CIFAR-100")
    p.add_argument("--data-dir", default="", help="folder with cifar100_mini.npz / cifar100.npz "
                   "('': $CIL_DATA, else ../shared/data, else ./data)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "long_sequences.json"),
                   help="results file (rewritten after every cell)")
    p.add_argument("--work-dir", default="", help="where the runs go ('': a temporary folder, removed at the end)")
    p.add_argument("--keep-runs", action="store_true", help="keep the temporary run folders")
    p.add_argument("--cell-timeout", type=float, default=0, help="seconds before a cell is killed (0: none)")
    args = p.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    tasks = [int(t) for t in args.tasks_list.split(",") if t.strip()]
    if any(t < 1 or NUM_CLASSES % t for t in tasks):
        p.error(f"every task count must divide {NUM_CLASSES} (got {tasks})")
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
                "git_sha": git_sha(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "command": sys.argv}
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
                row = run_cell(m, T, args, data_root, work)
                row["peak_rss_over_import_mib"] = round(row["peak_rss_mib"] - base["peak_rss_mib"], 1)
                if "error" not in row:
                    row.update(expected_row(row, v))
                rows.append(row)
                status = (f"failed (rc {row['returncode']}): {row['error'].strip().splitlines()[-1][:200] if row['error'].strip() else ''}"
                          if "error" in row else
                          f"{row['mean_task_seconds']:.2f} s/task, stored {row['stored_params'][-1]:,}"
                          f"{'' if row['stored_matches_expected'] else ' (differs from expected)'}")
                print(f"[{time.time() - t_start:7.1f} s] {m:11s} T={T:3d}: {row['wall_seconds']:.1f} s wall, "
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB, {status}", flush=True)
                write_json(args.out, {"settings": settings, "rows": rows,
                                      "total_seconds": round(time.time() - t_start, 1)})
    finally:
        if not args.keep_runs and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    lines = checks(rows, methods, v)
    write_json(args.out, {"settings": settings, "rows": rows, "checks": lines,
                          "total_seconds": round(time.time() - t_start, 1)})
    print()
    print(table(rows))
    print()
    print("Stored-parameter growth per task (n_t: classes per task; d = %d, L = %d):" % (v.embed_dim, v.depth))
    for line in lines:
        print("- " + line)
    print(f"\n{len(rows)} runs in {time.time() - t_start:.0f} s -> {args.out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
