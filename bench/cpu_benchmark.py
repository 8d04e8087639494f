"""Run the CPU benchmark: every row of the results table for each training seed, one run at a time.

    python bench/cpu_benchmark.py --rows sd_lora --seeds 0 --out /tmp/cpu   # one row, in a folder of yours
    python bench/cpu_benchmark.py --list               # what is committed, what is left, nothing run
    python bench/cpu_benchmark.py --commit             # maintainer: every row and seed into bench/results/cpu,
                                                       # each finished run git-committed with the tables
    python bench/cpu_benchmark.py --commit --until 21:20   # start only runs expected to end by then (local time)

Give exactly one of --out DIR and --commit. --out DIR runs the rows into DIR (results in DIR/<row>/seed<S>/,
checkpoints in DIR/runs/), never touches bench/results or git, and after each run prints where its results are
and how they compare with the committed run of that row and seed. --commit writes bench/results/cpu/ and
commits each run with the regenerated tables.

A row is a train.py run on the `cpu` preset (CIFAR-100, 10 tasks of 10 classes, class order seed 1993, v2
weights) with the row's extra options. After each run the task-id probe scores its final checkpoint, and the
run's results.json, config.json, acc_matrix.csv, its log and the probe's numbers are copied to
bench/results/cpu/<row>/seed<S>/ (--commit) or DIR/<row>/seed<S>/ (--out); the checkpoint stays in bench/runs/
or DIR/runs/ (not in the repository). With --commit, bench/table.py then rewrites the tables from every finished
run. A row/seed whose results.json is there is skipped;
one that an earlier attempt left stopped part-way (a session's end) continues after its last finished task
(`train.py --resume`, which gives the results of an uninterrupted run and refuses options that differ).
The sr2_lora rows also keep `sr2_ca_probe.py`'s printout (ca_probe.txt): SR²'s alignment loss against two
others, re-run from the final heads. The cl_lora rows keep `cl_lora_proto_probe.py`'s (proto_probe.txt, .json):
the stored prototypes against fresh ones from the final model. Seed 0 of the rows in NCM_ROWS keeps
`ncm_probe.py`'s (ncm_probe.txt, .json): the run's classifier against fresh class means. The inflora_ca and
sr2_lora_ca_ce rows keep `ca_stats_probe.py`'s (ca_stats_probe.txt, .json): the run's alignment re-run on
fresh class statistics (and for InfLoRA without its mean decay or logit norm); the inflora rows keep
`inflora_memory_probe.py`'s (memory_probe.txt, .json): how much of task 1's input energy its memory keeps.
Each sr2_lora_ca_ce run is followed by `frozen_ca_probe.py` for its seed (results/frozen_ca_probe/seed<S>.txt,
.json): the same classifier on the frozen backbone. After each run the script starts itself again (done runs
are skipped), so an edit of it takes effect at the next run.

A session that stops at a known time loses the run it stops (its checkpoint is not kept): `--until` starts a
run only if the row's longest finished uninterrupted run (probes included, from its train.log) would end
before then, takes the first such run in the usual order, and stops when none fits.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "cpu")
RUNS = os.path.join(HERE, "runs", "cpu")
FROZEN_CA = os.path.join(HERE, "results", "frozen_ca_probe")

# row name -> train.py options; the order is the table's
ROWS = {
    "joint": ["--method", "seq_lora", "--tasks", "1"],
    "seq_lora": ["--method", "seq_lora"],
    "simple_cil": ["--method", "simple_cil"],
    "inflora": ["--method", "inflora"],
    "inflora_ca": ["--method", "inflora", "--ca"],
    "sd_lora": ["--method", "sd_lora"],
    "sd_lora_rr": ["--method", "sd_lora", "--variant", "rr"],
    "sd_lora_kd": ["--method", "sd_lora", "--variant", "kd"],
    "cl_lora": ["--method", "cl_lora"],
    "c_lora": ["--method", "c_lora"],
    "keep_lora": ["--method", "keep_lora"],
    "sr2_lora": ["--method", "sr2_lora"],
    "sr2_lora_ca_ce": ["--method", "sr2_lora", "--ca", "ce"],
}
SEEDS = (0, 1, 2)
# the rows whose method evaluates through a folded backbone (ncm_probe.py), probed on seed 0 (minutes per run)
NCM_ROWS = ("seq_lora", "inflora", "inflora_ca", "sd_lora", "sd_lora_rr", "sd_lora_kd", "c_lora", "keep_lora",
            "sr2_lora", "sr2_lora_ca_ce")
KEPT = ("results.json", "config.json", "acc_matrix.csv")


def done(row: str, seed: int, results: str = RESULTS) -> bool:
    return os.path.isfile(os.path.join(results, row, f"seed{seed}", "results.json"))


def expected_seconds(row: str) -> float | None:
    """The longest wall time (probes included) of the row's finished runs that ran uninterrupted, else None."""
    times = []
    for seed in SEEDS:
        log = os.path.join(RESULTS, row, f"seed{seed}", "train.log")
        if os.path.isfile(log):
            with open(log) as f:  # a resumed run logs "wall time of the run since it resumed": a part, not counted
                times += [float(line.split(": ")[1].split()[0]) for line in f
                          if line.startswith("wall time of the run: ")]
    return max(times, default=None)


def fitting(todo: list[tuple[str, int]], left_s: float, expected: dict[str, float | None]) -> tuple[str, int] | None:
    """The first (row, seed) of todo whose expected seconds fit in left_s; a row with no estimate is taken to need
    the longest estimate of any row. None if nothing fits."""
    longest = max((v for v in expected.values() if v is not None), default=float("inf"))
    for row, seed in todo:
        need = expected.get(row)
        if (longest if need is None else need) <= left_s:
            return row, seed
    return None


def until(text: str) -> datetime:
    """--until: HH:MM today, or YYYY-MM-DDTHH:MM; local time, never rolled over to the next day."""
    try:
        if "T" in text:
            return datetime.fromisoformat(text)
        hm = datetime.strptime(text, "%H:%M")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither HH:MM nor YYYY-MM-DDTHH:MM") from None
    return datetime.now().replace(hour=hm.hour, minute=hm.minute, second=0, microsecond=0)


def command(row: str, seed: int, data_root: str, weights: str, out: str) -> list[str]:
    tasks = [] if "--tasks" in ROWS[row] else ["--tasks", "10"]  # joint sets its own
    return [sys.executable, "train.py", "--preset", "cpu", *tasks, *ROWS[row], "--seed", str(seed),
            "--data-root", data_root, "--weights", weights, "--out", out]


def unfinished(out: str) -> str | None:
    """The run directory an earlier, stopped attempt left in `out` with at least one finished task, else None."""
    if not os.path.isdir(out):
        return None
    dirs = [os.path.join(out, d) for d in sorted(os.listdir(out))
            if os.path.isfile(os.path.join(out, d, "checkpoint.pt"))]
    return dirs[-1] if len(dirs) == 1 else None


def probes(row: str, seed: int, run_dir: str, dest: str, data_root: str, weights: str,
           frozen: str = FROZEN_CA) -> list[tuple[str, list[str]]]:
    """What runs after a run, in order: (the file that keeps its printout, [script in bench/probes/, its arguments]).
    frozen: the folder of frozen_ca_probe.py's results."""
    out = [(os.path.join(dest, "probe.txt"), ["task_id_probe.py", run_dir, "--data-root", data_root, "--json",
                                              os.path.join(dest, "task_id.json")])]
    if row == "sr2_lora":  # SR²'s own alignment loss against two others, from this run's final heads
        out.append((os.path.join(dest, "ca_probe.txt"), ["sr2_ca_probe.py", run_dir, "--data-root", data_root]))
    if row == "cl_lora":  # are its old prototypes stale? stored against fresh ones from the final model
        out.append((os.path.join(dest, "proto_probe.txt"),
                    ["cl_lora_proto_probe.py", run_dir, "--data-root", data_root, "--json",
                     os.path.join(dest, "proto_probe.json")]))
    if seed == 0 and row in NCM_ROWS:  # representation or classifier? fresh class means on the final features
        out.append((os.path.join(dest, "ncm_probe.txt"), ["ncm_probe.py", run_dir, "--data-root", data_root, "--json",
                                                          os.path.join(dest, "ncm_probe.json")]))
    if row == "inflora":  # how much of task 1's input its memory protects, the official criterion vs the paper's
        out.append((os.path.join(dest, "memory_probe.txt"),
                    ["inflora_memory_probe.py", run_dir, "--data-root", data_root, "--json",
                     os.path.join(dest, "memory_probe.json")]))
    if row in ("inflora_ca", "sr2_lora_ca_ce"):  # the alignment re-run on fresh statistics (and, for InfLoRA,
        out.append((os.path.join(dest, "ca_stats_probe.txt"),  # without its mean decay or its logit norm)
                    ["ca_stats_probe.py", run_dir, "--data-root", data_root, "--json",
                     os.path.join(dest, "ca_stats_probe.json")]))
    if row == "sr2_lora_ca_ce":  # the same classifier on the frozen backbone (depends on the seed only)
        base = os.path.join(frozen, f"seed{seed}")
        out.append((base + ".txt", ["frozen_ca_probe.py", "--data-root", data_root, "--weights", weights, "--seed",
                                    str(seed), "--json", base + ".json"]))
    return out


def run_one(row: str, seed: int, data_root: str, weights: str, results: str = RESULTS, runs: str = RUNS,
            frozen: str = FROZEN_CA) -> str:
    """One train.py run and its probes; returns the results folder (results/<row>/seed<S>). Raises on a failed run."""
    out = os.path.join(runs, f"{row}_s{seed}")
    log = os.path.join(out, "train.log")
    cmd = command(row, seed, data_root, weights, os.path.relpath(out, ROOT))
    earlier = unfinished(out)
    if earlier:  # continue it after its last finished task: the same results as an uninterrupted run
        cmd += ["--resume", os.path.relpath(earlier, ROOT)]  # train.py refuses if the options differ from the run's
    else:  # nothing of an earlier attempt worth keeping
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{row} seed {seed}: train.py exited {rc}; see {log}")
    run_dir = next(os.path.join(out, d) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    dest = os.path.join(results, row, f"seed{seed}")
    os.makedirs(dest, exist_ok=True)
    for txt, script in probes(row, seed, run_dir, dest, data_root, weights, frozen):
        os.makedirs(os.path.dirname(txt), exist_ok=True)
        with open(txt, "w") as f:
            rc = subprocess.run([sys.executable, os.path.join(HERE, "probes", script[0]), *script[1:]], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{row} seed {seed}: {script[0]} exited {rc}; see {txt}")
    with open(log, "a") as f:
        since = " since it resumed" if earlier else ""
        f.write(f"wall time of the run{since}: {time.time() - t0:.0f} s (probes included)\n")
    shutil.copy(log, os.path.join(dest, "train.log"))
    for name in reversed(KEPT):  # results.json last: done() reads it
        shutil.copy(os.path.join(run_dir, name), os.path.join(dest, name))
    return dest


def commit(row: str, seed: int, dest: str) -> None:
    """Commit this run's files and the regenerated tables (only these paths), retrying while git is busy."""
    with open(os.path.join(dest, "results.json")) as f:
        last = json.load(f)["last_acc"]
    paths = [os.path.relpath(dest, ROOT), os.path.relpath(FROZEN_CA, ROOT), "README.md", "bench/README.md",
             "bench/results/cpu_summary.json", "bench/results/cpu_curves.png", "bench/results/cpu_last_acc.png"]
    paths = [p for p in paths if os.path.exists(os.path.join(ROOT, p))]
    for _ in range(30):
        add = subprocess.run(["git", "add", "--", *paths], cwd=ROOT, capture_output=True, text=True)
        if add.returncode == 0:
            c = subprocess.run(["git", "commit", "-q", "-m", f"cpu benchmark: {row} seed {seed} (A_T {last:.2f})",
                                "--", *paths], cwd=ROOT, capture_output=True, text=True)
            if c.returncode == 0:
                return
        time.sleep(10)
    print(f"could not commit {row} seed {seed}", flush=True)


def compare(row: str, seed: int, dest: str) -> str:
    """Two lines: where a run's results are, and its scores beside the committed run of the same row and seed."""
    with open(os.path.join(dest, "results.json")) as f:
        mine = json.load(f)
    line = f"{row} seed {seed}: results in {dest}\n  this run:      " + scores(mine)
    committed = os.path.join(RESULTS, row, f"seed{seed}", "results.json")
    if os.path.abspath(committed) == os.path.abspath(os.path.join(dest, "results.json")):
        return line
    if not os.path.isfile(committed):
        return line + f"\n  committed run: none ({os.path.relpath(committed, ROOT)} is not there)"
    with open(committed) as f:
        theirs = json.load(f)
    diff = mine["last_acc"] - theirs["last_acc"]
    return (line + "\n  committed run: " + scores(theirs)
            + f"\n  A_T differs by {diff:+.2f} points ({os.path.relpath(committed, ROOT)})")


def scores(res: dict) -> str:
    forget = res.get("forgetting")
    return (f"A_T {res['last_acc']:.2f}, average incremental {res['avg_inc_acc']:.2f}, forgetting "
            + ("–" if forget is None else f"{forget:.2f}") + f", {res.get('tasks_done', len(res['curve']))} tasks")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help="rows of the table: " + " ".join(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--data-root", default=os.environ.get("CIL_DATA") or os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--weights", default=os.environ.get("CIL_WEIGHTS")
                   or os.path.join(ROOT, "..", "shared", "weights", "vit_small32_tin.pth"))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="run into DIR (results DIR/<row>/seed<S>/); never commits")
    where.add_argument("--commit", action="store_true",
                       help="maintainer: run into bench/results/cpu and git-commit each run with the tables")
    p.add_argument("--list", action="store_true", help="print what is done and what is left; run nothing")
    p.add_argument("--until", type=until, metavar="HH:MM",
                   help="start only a run expected to end before this local time (HH:MM today, or YYYY-MM-DDTHH:MM)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if a.seeds and min(a.seeds) < 0:
        p.error(f"--seeds must be >= 0 (got {min(a.seeds)})")
    if a.out is not None and os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out}: exists and is not a folder")
    results = RESULTS if a.out is None else os.path.abspath(a.out)
    todo = [(r, s) for s in a.seeds for r in a.rows if not done(r, s, results)]
    if a.list:
        for s in a.seeds:
            print(f"seed {s}: done " + " ".join(r for r in a.rows if done(r, s, results)))
        print("left:", " ".join(f"{r}/s{s}" for r, s in todo) or "nothing")
        expected = {r: expected_seconds(r) for r in a.rows}
        print("expected minutes per run (longest finished, probes included): "
              + " ".join(f"{r} {'?' if v is None else round(v / 60)}" for r, v in expected.items()))
        return
    for flag, path in (("--data-root", a.data_root), ("--weights", a.weights)):
        if not os.path.exists(path):
            p.error(f"{flag} {path}: no such file or folder (CIFAR-100 and the v2 weights: see bench/README.md)")
    if a.out is None and not a.commit:
        p.error("say where the runs go: --out DIR (a folder of yours; compared with the committed runs) "
                "or --commit (maintainer: bench/results/cpu, git-committed)")
    for r, s in [(r, s) for s in a.seeds for r in a.rows if (r, s) not in todo]:
        print(f"{r} seed {s}: already done in {os.path.join(results, r, f'seed{s}')} (skipped)", flush=True)
    if not todo:
        print("nothing left to run" + ("" if a.commit else f"; remove {results}/<row>/seed<S> to run one again"))
        return
    row, seed = todo[0]
    if a.until is not None:
        left = (a.until - datetime.now()).total_seconds()
        pick = fitting(todo, left, {r: expected_seconds(r) for r in ROWS})
        if pick is None:
            print(f"{time.strftime('%H:%M:%S')} no run left is expected to end before {a.until:%Y-%m-%d %H:%M}; "
                  "stopping", flush=True)
            return
        row, seed = pick
    t0 = time.time()
    print(f"{time.strftime('%H:%M:%S')} {row} seed {seed} ...", flush=True)
    if a.commit:
        dest = run_one(row, seed, os.path.abspath(a.data_root), os.path.abspath(a.weights))
        subprocess.run([sys.executable, os.path.join(HERE, "table.py")], cwd=ROOT)
        commit(row, seed, dest)
    else:
        dest = run_one(row, seed, os.path.abspath(a.data_root), os.path.abspath(a.weights), results,
                       os.path.join(results, "runs"), os.path.join(results, "frozen_ca_probe"))
    print(f"{time.strftime('%H:%M:%S')} {row} seed {seed} done in {time.time() - t0:.0f} s", flush=True)
    print(compare(row, seed, dest), flush=True)
    if len(todo) == 1:
        return
    # then the next run: start again from the top (done runs are skipped), so that an edit of this file
    # takes effect at the next run; with the options as parsed, --until as a date and time (no move at midnight)
    argv = [os.path.abspath(__file__), "--rows", *a.rows, "--seeds", *map(str, a.seeds), "--data-root", a.data_root,
            "--weights", a.weights] + (["--commit"] if a.commit else ["--out", results])
    if a.until is not None:
        argv += ["--until", a.until.strftime("%Y-%m-%dT%H:%M")]
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    main()
