"""Every results table in README.md and bench/README.md, made from the results files under bench/results/.

    python bench/table.py            # rewrite the tables, bench/results/cpu_summary.json and the two figures
    python bench/table.py --check    # exit 1, naming each table (or the summary) that is out of date

A table sits between a line `<!-- table:NAME -->` and a line `<!-- /table:NAME -->`; NAME is a key of TABLES
below, whose function reads its results file(s) and returns the markdown. Nothing between the markers is ever
typed by hand. `--check` also fails on a markdown table outside the markers unless its header line is one of
NOT_RESULTS (the tables that describe options and formulas, not measurements), on a missing figure, and on a
decimal number in the prose (outside tables and code) that is in none of the generated tables, none of the
results files its paragraph or bullet names (rounded to the prose's decimals) and not in CONSTANTS. It cannot
prove a number right (one can match by chance), but a number typed with no source to check it by fails. The
figures themselves are not compared (their bytes depend on the matplotlib version); they are redrawn by the
rewrite, which is the only part that imports matplotlib.

The CPU benchmark (bench/cpu_benchmark.py) writes bench/results/cpu/<row>/seed<S>/{results.json, task_id.json,
...}. Over the finished seeds of a row: mean and sample standard deviation (ddof = 1; none for one seed).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cpu_benchmark import ROWS, SEEDS  # noqa: E402  (no torch: the row list only)

DOCS = ("README.md", os.path.join("bench", "README.md"), os.path.join("bench", "probes", "README.md"))
SUMMARY = os.path.join("bench", "results", "cpu_summary.json")
FIGURES = (os.path.join("bench", "results", "cpu_curves.png"), os.path.join("bench", "results", "cpu_last_acc.png"))
METRICS = ("last_acc", "avg_inc_acc", "forgetting")
# header lines of the markdown tables that are not results (options, formulas, method descriptions)
NOT_RESULTS = {
    "| preset | backbone | data | epochs, batch | precision | what it is for |",
    "| `--method` | paper | official code (commit read) | what differs from sequential LoRA |",
    "| metric | formula | in results.json |",
    "| dataset | split | train / test | where it comes from |",
}


# ----------------------------------------------------------------------------------------------------
# Reading the results


def load(root: str, rel: str):
    with open(os.path.join(root, rel)) as f:
        return json.load(f)


def label(row: str) -> str:
    """A table's row: its name for `cpu_benchmark.py --rows` and its train.py options, e.g.
    'inflora_ca (`--method inflora --ca`)'."""
    return f"{row} (`{' '.join(ROWS[row])}`)"


def legend(row: str) -> str:
    """A figure's name of a row: 'joint (seq_lora --tasks 1)', 'inflora --ca', 'sd_lora --variant rr', 'cl_lora'."""
    opts = ROWS[row]
    method, extra = opts[opts.index("--method") + 1], [o for i, o in enumerate(opts)
                                                       if o != "--method" and opts[i - 1] != "--method"]
    if row == "joint":
        return f"joint ({method} {' '.join(extra)})"
    return method + (f" {' '.join(extra)}" if extra else "")


def cpu_runs(root: str) -> dict:
    """row -> {seed: {"results": ..., "probe": ... or None}} for every finished run."""
    out = {}
    for row in ROWS:
        seeds = {}
        base = os.path.join(root, "bench", "results", "cpu", row)
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            m = re.fullmatch(r"seed(\d+)", d)
            if m and os.path.isfile(os.path.join(base, d, "results.json")):
                probe = os.path.join(base, d, "task_id.json")
                seeds[int(m.group(1))] = {"results": load(base, os.path.join(d, "results.json")),
                                          "probe": load(base, os.path.join(d, "task_id.json"))
                                          if os.path.isfile(probe) else None}
        out[row] = dict(sorted(seeds.items()))
    return out


def stats(xs: list[float]) -> dict:
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": round(mean, 4), "std": None if std is None else round(std, 4)}


def pm(s: dict | None) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")


def metric(seeds: dict, key: str) -> dict | None:
    """stats of a results.json field over seeds; forgetting of a one-task run (joint) is undefined: None."""
    xs = [s["results"][key] for s in seeds.values()
          if not (key.startswith("forgetting") and s["results"]["tasks_done"] < 2)]
    return stats(xs) if xs else None


def probe_metric(seeds: dict, key: str) -> dict | None:
    """stats of a task_id.json field over seeds; a one-task run (joint) has no task to tell apart: None."""
    xs = [s["probe"][key] for s in seeds.values() if s["probe"] is not None and s["results"]["tasks_done"] > 1]
    return stats(xs) if xs else None


def summary(root: str) -> dict:
    runs, rows = cpu_runs(root), []
    for row, seeds in runs.items():
        if not seeds:
            continue
        entry = {"row": row, "seeds": list(seeds)}
        for key in METRICS:
            entry[key] = metric(seeds, key)
        entry["task_id_acc"] = probe_metric(seeds, "task_id")
        entry["within_task_acc"] = probe_metric(seeds, "within_task")
        rows.append(entry)
    return {"benchmark": "CIFAR-100 B0-Inc10, train.py --preset cpu (vit_small32, v2 weights vit_small32_tin.pth), "
                         "class order seed 1993; mean and sample std (ddof 1) over the training seeds",
            "rows": rows}


# ----------------------------------------------------------------------------------------------------
# The tables


def md(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def t_cpu(root: str) -> str:
    """README: the CPU benchmark, mean ± std over seeds, with the task-id probe."""
    runs, rows = cpu_runs(root), []
    for row, seeds in runs.items():
        done = f"{len(seeds)} of {len(SEEDS)}"
        if not seeds:
            rows.append([label(row), done, "pending", "", "", "", ""])
            continue
        rows.append([label(row), done] + [pm(metric(seeds, k)) for k in METRICS] +
                    [pm(probe_metric(seeds, "task_id")), pm(probe_metric(seeds, "within_task"))])
    return md(["row", "seeds", "last acc A_T", "avg. incremental Ā", "forgetting F", "task-id acc", "within-task acc"],
              rows)


def t_cpu_goal(root: str) -> str:
    """The issue's goal, row by row: above seq_lora on A_T, below it on forgetting, the best within 3 of joint;
    and beside it the bar a trained backbone has to pass, SimpleCIL's frozen one."""
    runs = cpu_runs(root)
    seq, joint, simple = runs["seq_lora"], runs["joint"], runs["simple_cil"]
    if not seq or not joint:
        return md(["row", "A_T − seq_lora's", "F − seq_lora's", "joint's A_T − A_T"],
                  [["(needs the seq_lora and joint runs)", "", "", ""]])
    s_a, s_f, j_a = (metric(seq, "last_acc")["mean"], metric(seq, "forgetting")["mean"],
                     metric(joint, "last_acc")["mean"])
    c_a = metric(simple, "last_acc")["mean"] if simple else None

    def paired(seeds: dict, key: str, better) -> str:
        """On how many of the seeds both rows have the row beats seq_lora's run of the same seed."""
        both = [k for k in seeds if k in seq]
        won = sum(better(seeds[k]["results"][key], seq[k]["results"][key]) for k in both)
        return f"{won} of {len(both)}"

    rows = []
    for row, seeds in runs.items():
        if row in ("joint", "seq_lora") or not seeds:
            continue
        a, f = metric(seeds, "last_acc")["mean"], metric(seeds, "forgetting")["mean"]
        rows.append([label(row), f"{len(seeds)} of {len(SEEDS)}", f"{a - s_a:+.2f}", "yes" if a > s_a else "NO",
                     paired(seeds, "last_acc", lambda x, y: x > y), f"{f - s_f:+.2f}", "yes" if f < s_f else "NO",
                     paired(seeds, "forgetting", lambda x, y: x < y), f"{j_a - a:.2f}",
                     "yes" if j_a - a <= 3 else "no", "–" if c_a is None or row == "simple_cil" else f"{a - c_a:+.2f}"])
    return md(["row", "seeds", "A_T − seq_lora's", "above", "above, seed by seed", "F − seq_lora's", "below",
               "below, seed by seed", "joint's A_T − A_T", "within 3", "A_T − simple_cil's"], rows)


def t_cpu_seeds(root: str) -> str:
    """bench/README: every seed's numbers, and the metrics the README leaves out."""
    rows = []
    for row, seeds in cpu_runs(root).items():
        for seed, s in seeds.items():
            r, p = s["results"], s["probe"]
            one = r["tasks_done"] < 2
            rows.append([label(row), str(seed), f"{r['last_acc']:.2f}", f"{r['avg_inc_acc']:.2f}",
                         "–" if one else f"{r['forgetting']:.2f}", "–" if one else f"{r['forgetting_pilot']:.2f}",
                         "–" if one else f"{r['bwt']:.2f}", " / ".join(f"{a:.1f}" for a in r["curve"]),
                         f"{r['acc_matrix'][-1][-1]:.2f}",
                         "–" if p is None else f"{p['task_agnostic']:.2f} / {p['within_task']:.2f} / {p['task_id']:.2f}"])
    return md(["row", "seed", "A_T", "Ā", "F", "F (PILOT)", "BWT", "a_t after each task", "newest task (last)",
               "probe: task-agnostic / within-task / task-id"], rows)


def t_cpu_v1(root: str) -> str:
    """bench/README: the earlier single-seed runs (v1 backbone, code before the method-file review)."""
    names = ["seq_lora", "simple_cil", "inflora", "inflora_ca", "sd_lora", "sd_lora_rr", "cl_lora", "c_lora",
             "keep_lora", "sr2_lora", "sr2_lora_ca_ce"]
    rows = []
    for n in names:
        r = load(root, f"bench/results/cpu_v1/{n}_results.json")
        rows.append([label(n), f"{r['last_acc']:.2f}", f"{r['avg_inc_acc']:.2f}", f"{r['forgetting']:.2f}",
                     " / ".join(f"{a:.1f}" for a in r["curve"])])
    return md(["row", "A_T", "Ā", "F", "a_t after each task"], rows)


def ca_probe_rows(path: str) -> list[list[str]]:
    """sr2_ca_probe.py's printout -> [loss, test acc, replay acc, images won per task's head] per alignment loss."""
    with open(path) as f:
        lines = f.read().splitlines()[1:]
    rows = []
    for line in lines:
        m = re.fullmatch(r"(.+?)\s+test acc\s+([\d.]+)\s+replay acc\s+([\d.]+)\s+test images won by each task's head "
                         r"\[([\d, ]+)\]", line.strip())
        if m:
            rows.append([m.group(1), m.group(2), m.group(3), m.group(4)])
    return rows


def t_sr2_ca_probe_v1(root: str) -> str:
    """bench/README: sr2_ca_probe.py on the v1 run's task-7 checkpoint."""
    rows = ca_probe_rows(os.path.join(root, "bench", "results", "cpu_v1", "sr2_ca_probe_task7.txt"))
    return md(["alignment loss", "test acc", "replay acc", "test images won by each task's head (1000 each)"], rows)


def t_sr2_ca_probe(root: str) -> str:
    """bench/README: sr2_ca_probe.py on the final checkpoint of every sr2_lora benchmark run."""
    rows = []
    for seed in cpu_runs(root)["sr2_lora"]:
        path = os.path.join(root, "bench", "results", "cpu", "sr2_lora", f"seed{seed}", "ca_probe.txt")
        if os.path.isfile(path):
            rows += [[str(seed)] + r for r in ca_probe_rows(path)]
    return md(["seed", "alignment loss (from the run's final heads)", "test acc", "replay acc",
               "test images won by each task's head (1000 each)"], rows or [["(no sr2_lora run yet)", "", "", "", ""]])


def t_cl_lora_proto_probe(root: str) -> str:
    """bench/README: cl_lora_proto_probe.py (stored vs fresh prototypes) on every cl_lora benchmark run."""
    rows = []
    for seed in cpu_runs(root)["cl_lora"]:
        path = os.path.join("bench", "results", "cpu", "cl_lora", f"seed{seed}", "proto_probe.json")
        if os.path.isfile(os.path.join(root, path)):
            p = load(root, path)
            rows.append([str(seed), " / ".join(f"{c:.2f}" for c in p["cos_stored_fresh"])]
                        + [x for k in ("stored", "fresh") for x in
                           (f"{p[k]['acc']:.2f}", f"{p[k]['task_id']:.2f}", " / ".join(map(str, p[k]["won"])))])
    return md(["seed", "cos(stored, fresh prototype) per task", "A_T stored", "task-id stored",
               "images won per task, stored", "A_T fresh", "task-id fresh", "images won per task, fresh"],
              rows or [["(no cl_lora probe yet)"] + [""] * 7])


def t_ncm_probe(root: str) -> str:
    """bench/README: ncm_probe.py (the run's classifier vs fresh class means) on the runs that have one."""
    rows = []
    for row, seeds in cpu_runs(root).items():
        for seed in seeds:
            path = os.path.join("bench", "results", "cpu", row, f"seed{seed}", "ncm_probe.json")
            if os.path.isfile(os.path.join(root, path)):
                p = load(root, path)
                rows.append([label(row), str(seed)] + [x for k in ("run", "ncm") for x in
                             (f"{p[k]['acc']:.2f}", f"{p[k]['task_id']:.2f}", " / ".join(map(str, p[k]["won"])))])
    return md(["row", "seed", "A_T (run)", "task-id (run)", "images won per task (run)", "A_T (fresh means)",
               "task-id (fresh means)", "images won per task (fresh means)"],
              rows or [["(no probe yet)"] + [""] * 7])


def t_step_time(root: str, rel: str = "bench/results/step_time_cpu.json") -> str:
    rows = [[r["method"], f"{r['seconds_per_step']:.3f}",
             "–" if r["ratio_to_seq_lora"] is None else f"{r['ratio_to_seq_lora']:.2f}", f"{r['trainable_params']:,}"]
            for r in load(root, rel)["rows"]]
    return md(["method", "s/step", "ratio to seq_lora", "trainable parameters (task 2)"], rows)


def t_step_time_bf16(root: str) -> str:
    """Each method's bf16-autocast entry against its own fp32 entry of the same run (step_time.py NAME@bf16)."""
    rows = load(root, "bench/results/step_time_bf16_cpu.json")["rows"]
    fp32 = {r["method"]: r["seconds_per_step"] for r in rows if r["amp"] == "none"}
    out = []
    for r in rows:
        if r["amp"] == "bf16":
            name, s = r["method"].partition("@")[0], r["seconds_per_step"]
            out.append([name, f"{fp32[name]:.3f}", f"{s:.3f}", f"{s / fp32[name]:.2f}"])
    return md(["method", "fp32 s/step", "bf16 autocast s/step", "bf16 / fp32"], out)


def t_kd_update_runs(root: str) -> str:
    import compare_runs
    base = os.path.join(root, "bench", "results", "cl_lora_kd_update")
    lines = ["| run | a_t after each task | old classes (last task) | newest task | optimiser steps per task "
             "| s per batch per task |", "|---|---|---|---|---|---|"]
    return "\n".join(lines + [compare_runs.row(n, os.path.join(base, f"{n}_results.json")) for n in ("two_step", "joint")])


def t_kd_update_step_time(root: str) -> str:
    return t_step_time(root, "bench/results/step_time_cl_lora_kd_update_cpu.json")


def t_adapter_mechanism(root: str) -> str:
    rows = [[r["variant"], f"{r['seconds_per_step']:.4f}", f"{r['ratio_to_old']:.3f}"]
            for r in load(root, "bench/results/adapter_mechanism_cpu.json")["rows"]]
    return md(["variant", "s/step", "ratio to old"], rows)


def t_long_sequences(root: str) -> str:
    import constant_cost  # its --train-runs wrote this file
    res = load(root, "bench/results/long_sequences.json")
    by = {}
    for r in res["rows"]:
        by.setdefault(r["method"], {})[r["tasks"]] = r
    rows = []
    for method, cells in by.items():
        Ts = sorted(cells)
        last = cells[Ts[-1]]
        ok = all(c.get("stored_matches_expected") for c in cells.values())
        fit = constant_cost.fit_growth([cells[T] for T in Ts])
        growth = "–" if fit is None else f"{fit[0]:,.0f} + {fit[1]:,.0f}·n_t (residual {fit[2]:.0f})"
        rows.append([method, " / ".join(f"{cells[T]['peak_rss_mib']:.0f}" for T in Ts), f"{last['stored_params'][-1]:,}",
                     growth, "yes" if ok else "NO", f"{last['mean_task_seconds']:.2f} / {last['mean_eval_seconds']:.2f}"])
    Ts = " / ".join(str(T) for T in sorted({r["tasks"] for r in res["rows"]}))
    return md(["method", f"peak RSS MiB, T = {Ts}", f"stored after T = {max(r['tasks'] for r in res['rows'])}",
               "stored growth per task (fit over every T)", "= header formula, every task",
               "s/task at the largest T (train+hooks / eval)"], rows)


def t_constant_cost(root: str) -> str:
    import constant_cost
    res = load(root, "bench/results/constant_cost.json")
    return constant_cost.describe(res) + "\n\n" + constant_cost.table(res)


def t_paper_shapes(root: str) -> str:
    import paper_shapes
    res = load(root, "bench/results/paper_shapes_cpu.json")
    return paper_shapes.describe(res) + "\n\n" + paper_shapes.table(res)


# name -> function(root) -> markdown; the docs say where each one goes
def t_frozen_ca_probe(root: str) -> str:
    """bench/README: frozen_ca_probe.py (sr2_lora's classifier on the frozen backbone) beside the runs it isolates:
    sr2_lora --ca ce and sr2_lora (trained backbone, the same classifiers) and simple_cil (frozen, class means)."""
    base, runs, rows = os.path.join(root, "bench", "results", "frozen_ca_probe"), cpu_runs(root), []
    names = sorted(os.listdir(base)) if os.path.isdir(base) else []
    for seed in sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"seed(\d+)\.json", n))):
        p = load(base, f"seed{seed}.json")
        for ca, r in p["runs"].items():
            rows.append([str(seed), "frozen (this probe)", f"sr2_lora heads, `--ca {ca}` alignment",
                         f"{r['last_acc']:.2f}", f"{r['avg_inc_acc']:.2f}", f"{r['task_id']:.2f}",
                         " / ".join(map(str, r["won"]))])
        for row, backbone, classifier in (("sr2_lora_ca_ce", "trained (the run)", "sr2_lora heads, `--ca ce`"),
                                          ("sr2_lora", "trained (the run)", "sr2_lora heads, `--ca sr2`"),
                                          ("simple_cil", "frozen (the run)", "class means (SimpleCIL)")):
            run = runs[row].get(seed)
            if run and run["probe"]:
                r, q = run["results"], run["probe"]
                rows.append([str(seed), backbone, classifier, f"{r['last_acc']:.2f}", f"{r['avg_inc_acc']:.2f}",
                             f"{q['task_id']:.2f}", " / ".join(map(str, q["won"]))])
    return md(["seed", "backbone", "classifier", "A_T", "Ā", "task-id", "images won per task"],
              rows or [["(no probe yet)"] + [""] * 6])


def t_ca_stats_probe(root: str) -> str:
    """bench/README: ca_stats_probe.py (the run's alignment re-run without InfLoRA's rules, or on fresh statistics)
    on the runs that have one, and how far each task's stored class means are from fresh ones."""
    rows = []
    for row, seeds in cpu_runs(root).items():
        for seed in seeds:
            path = os.path.join("bench", "results", "cpu", row, f"seed{seed}", "ca_stats_probe.json")
            if os.path.isfile(os.path.join(root, path)):
                p = load(root, path)
                drift = [" / ".join(f"{d[k]:.3f}" for d in p["drift"]) for k in ("cos", "rel_shift")]
                for tag, v in [("checkpoint (aligned in the run)", p["checkpoint"])] + list(p["variants"].items()):
                    rows.append([label(row), str(seed), tag, f"{v['acc']:.2f}", f"{v['task_id']:.2f}",
                                 " / ".join(map(str, v["won"]))] + drift)
                    drift = ["", ""]  # per run, on its first line
    return md(["row", "seed", "alignment re-run from the final heads", "A_T", "task-id", "images won per task",
               "cos(stored, fresh class mean), per task", "‖stored − fresh‖ / ‖fresh‖, per task"],
              rows or [["(no probe yet)"] + [""] * 7])


def t_inflora_memory_probe(root: str) -> str:
    """bench/README: inflora_memory_probe.py (task 1's input energy inside the memory, official vs paper criterion)."""
    rows = []
    for seed in cpu_runs(root)["inflora"]:
        path = os.path.join("bench", "results", "cpu", "inflora", f"seed{seed}", "memory_probe.json")
        if os.path.isfile(os.path.join(root, path)):
            for i, b in enumerate(load(root, path)["blocks"]):
                rows.append([str(seed), str(i)] + [x for k in ("code", "paper") for x in
                             (f"{b[k]['directions']} of {b['d']}", f"{100 * b[k]['captured']:.1f}")]
                            + [f"{100 * b['captured_final_memory']:.1f}"])
    return md(["seed", "block", "kept after task 1, official (sigma^4)", "task-1 input energy inside, %",
               "kept, paper (sigma^2)", "inside, %", "inside the run's final memory, %"],
              rows or [["(no probe yet)"] + [""] * 6])


def wall_minutes(root: str) -> list[float]:
    """The committed CPU-benchmark runs' wall times in minutes (uninterrupted runs, probes included)."""
    out = []
    for log in glob.glob(os.path.join(root, "bench", "results", "cpu", "*", "seed*", "train.log")):
        with open(log) as f:
            out += [float(ln.split(": ")[1].split()[0]) / 60 for ln in f if ln.startswith("wall time of the run: ")]
    return out


def t_overview(root: str) -> str:
    """bench/README's first screen: which command gives which table, its time on the build machine (from the
    results files), where its results land."""
    def took(rel: str, what: str = "") -> str:
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return "not run yet"
        return f"{load(root, rel)['total_seconds'] / 60:.0f} min{what}"

    mins = wall_minutes(root)
    cpu = (f"{min(mins):.0f}-{max(mins):.0f} min a run ({len(mins)} uninterrupted runs: {sum(mins) / 60:.0f} h)" if mins
           else "no run yet")
    gpu = os.path.join("bench", "results", "gpu", "summary.json")
    rows = [
        ["`python bench/cpu_benchmark.py --rows ROW --seeds S --out DIR`", "a row of README's Results (`cpu`, "
         "`cpu_goal`, `cpu_seeds`, the figures; the probe tables)", cpu, "DIR/ROW/seedS/ (`--commit`: "
         "results/cpu/)"],
        ["`python bench/table.py`", "every table here and in README.md, from the results files", "seconds",
         "the two READMEs, results/cpu_summary.json, cpu_*.png"],
        ["`python bench/step_time.py --methods ...`", "`step_time`, `step_time_bf16`, `kd_update_step_time`",
         "not recorded", "results/step_time_*.json"],
        ["`OMP_NUM_THREADS=2 python bench/constant_cost.py`", "`constant_cost`",
         took("bench/results/constant_cost.json"), "results/constant_cost.json"],
        ["`OMP_NUM_THREADS=2 python bench/constant_cost.py --train-runs`", "`long_sequences`",
         took("bench/results/long_sequences.json"), "results/long_sequences.json"],
        ["`OMP_NUM_THREADS=2 python bench/paper_shapes.py`", "`paper_shapes`",
         took("bench/results/paper_shapes_cpu.json"), "results/paper_shapes_cpu.json"],
        ["`python bench/paper_runs.py --list`", "README's Reproducing the papers: a train.py command per paper "
         "row; then `python bench/paper_table.py RUN...` compares", "not run here (a GPU)", "train.py's --out"],
        ["`bench/device_check.sh` (a GPU machine)", "the GPU checks", took(gpu) if os.path.isfile(
            os.path.join(root, gpu)) else "not run yet (budget 460 s)", "results/gpu/"],
    ]
    return md(["command", "reproduces", "time on the build machine", "results in bench/"], rows)


def t_paper(root: str) -> str:
    """README's 'Reproducing the papers': every row of bench/paper_numbers.json with its train.py command."""
    import paper_runs
    rows = paper_runs.load(os.path.join(root, "bench", "paper_numbers.json"))
    out = []
    for r, cmd in paper_runs.runs(rows):
        same = [p for p in rows if (p["row"], p["dataset"], p["tasks"], p["reported_by"]) ==
                (r["row"], r["dataset"], r["tasks"], r["reported_by"])]
        nums = "; ".join(f"{p['last_acc'] if p['last_acc'] is not None else 'not found'} / "
                         f"{p['avg_inc_acc'] if p['avg_inc_acc'] is not None else 'not found'} "
                         f"({p['kind']}{'' if p['verified'] else ', unverified'})" for p in same)
        out.append([r["row"], r["dataset"], str(r["tasks"]), r["reported_by"], nums,
                    f"`{' '.join(cmd[2:-2])}`" if cmd else "no counterpart here"])
    return md(["row", "dataset", "T", "reported by", "A_T / Ā", "`python train.py` ..."], out)


def t_paper_settings(root: str) -> str:
    """The OFFICIAL settings of every method file per dataset (`--preset paper --dataset NAME`): the code's, at
    ROOT, whatever the root of the documents."""
    sys.path.insert(0, ROOT)
    from methods import METHODS
    out = []
    for name, module in METHODS.items():
        have = getattr(module, "OFFICIAL", {})
        for ds, got in have.items():
            out.append([name, ds, ", ".join(f"`{k}={v}`" for k, v in got.items()) or "its Config defaults"])
        missing = [ds for ds in ("cifar100", "imagenet_r", "imagenet_a", "cub", "domainnet") if ds not in have]
        if missing:
            out.append([name, ", ".join(missing), "no official config: its CIFAR-100 values (the run says so)"])
    return md(["method", "dataset", "official settings (each value's config file and line: the method file)"], out)


TABLES = {
    "overview": t_overview,
    "paper": t_paper,
    "paper_settings": t_paper_settings,
    "cpu": t_cpu,
    "cpu_goal": t_cpu_goal,
    "cpu_seeds": t_cpu_seeds,
    "cpu_v1": t_cpu_v1,
    "sr2_ca_probe": t_sr2_ca_probe,
    "sr2_ca_probe_v1": t_sr2_ca_probe_v1,
    "cl_lora_proto_probe": t_cl_lora_proto_probe,
    "ncm_probe": t_ncm_probe,
    "frozen_ca_probe": t_frozen_ca_probe,
    "ca_stats_probe": t_ca_stats_probe,
    "inflora_memory_probe": t_inflora_memory_probe,
    "step_time": t_step_time,
    "step_time_bf16": t_step_time_bf16,
    "kd_update_runs": t_kd_update_runs,
    "kd_update_step_time": t_kd_update_step_time,
    "adapter_mechanism": t_adapter_mechanism,
    "long_sequences": t_long_sequences,
    "constant_cost": t_constant_cost,
    "paper_shapes": t_paper_shapes,
}


# ----------------------------------------------------------------------------------------------------
# Figures (the rewrite only)


def figures(root: str) -> None:
    runs = {row: seeds for row, seeds in cpu_runs(root).items() if seeds}
    if not runs:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # two panels of the same axes, the bounds and SimpleCIL in both: the InfLoRA/SD-LoRA lineage, then the rest
    fixed = {"joint": "black", "seq_lora": "black", "simple_cil": "grey"}  # the bounds and the no-training row
    panels = ([r for r in runs if r.startswith(("inflora", "sd_lora"))],
              [r for r in runs if r not in fixed and not r.startswith(("inflora", "sd_lora"))])
    palette = [c for i, c in enumerate(plt.get_cmap("tab10")(np.arange(10))) if i != 7] + ["navy"]  # 7 is grey
    color = {r: fixed.get(r) for r in runs if r in fixed}  # one colour per row, the same in both figures
    color.update({r: palette[i % 10] for i, r in enumerate(panels[0] + panels[1])})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, own in zip(axes, panels):
        for row in [r for r in runs if r in fixed] + own:
            seeds = runs[row]
            curves = np.array([s["results"]["curve"] for s in seeds.values()])
            c = color[row]
            name = f"{legend(row)} (n={len(seeds)})"
            if curves.shape[1] == 1:  # joint: one task over all classes, drawn as a reference line
                ax.axhline(curves.mean(), color=c, ls="--", lw=1.2, label=name)
                continue
            t, mean = np.arange(1, curves.shape[1] + 1), curves.mean(0)
            ls = ":" if row in fixed else "--" if row.endswith(("_kd", "_rr")) else "-"  # sd_lora's variants
            ax.plot(t, mean, color=c, marker="o", ms=3, lw=1.4, label=name, ls=ls)
            if len(curves) > 1:
                ax.fill_between(t, curves.min(0), curves.max(0), color=c, alpha=0.15, lw=0)
        ax.set_xticks(range(1, 11))
        ax.set(xlabel="after task")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set(ylabel="accuracy on all seen classes a_t (%)")
    fig.suptitle("CIFAR-100 B0-Inc10, --preset cpu (vit_small32, v2 weights): mean over seeds, band = min-max",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(root, FIGURES[0]), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [legend(r) for r in runs]
    means = [metric(s, "last_acc")["mean"] for s in runs.values()]
    stds = [metric(s, "last_acc")["std"] or 0.0 for s in runs.values()]
    ax.bar(range(len(runs)), means, color=[color[r] for r in runs])
    several = [i for i, s in enumerate(runs.values()) if len(s) > 1]  # no error bar on one seed
    ax.errorbar(several, [means[i] for i in several], yerr=[stds[i] for i in several], fmt="none", ecolor="black",
                capsize=3, lw=1)
    for i, (m, sd) in enumerate(zip(means, stds)):  # above the error bar
        ax.text(i, m + sd + 0.4, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(runs)), [f"{n}\n(n={len(s)})" for n, s in zip(names, runs.values())],
                  rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="last accuracy A_T (%)", title="A_T, mean ± sample std over seeds (--preset cpu)")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(root, FIGURES[1]), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Rewriting and checking the documents

MARK = re.compile(r"<!-- (/?)table:([a-z0-9_]+) -->")


def rewrite(text: str, root: str, doc: str) -> tuple[str, list[str]]:
    """(the document with every table block re-rendered, the names of the blocks that changed)."""
    out, changed, lines, i = [], [], text.split("\n"), 0
    while i < len(lines):
        m = MARK.fullmatch(lines[i].strip())
        if not m:
            out.append(lines[i])
            i += 1
            continue
        closing, name = m.groups()
        if closing or name not in TABLES:
            raise SystemExit(f"{doc}:{i + 1}: " + (f"'{lines[i].strip()}' closes no open table" if closing
                             else f"unknown table '{name}' (known: {', '.join(TABLES)})"))
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == f"<!-- /table:{name} -->"), None)
        if end is None:
            raise SystemExit(f"{doc}:{i + 1}: table '{name}' is not closed by '<!-- /table:{name} -->'")
        new = TABLES[name](root).split("\n")
        if lines[i + 1:end] != new:
            changed.append(name)
        out += [lines[i]] + new + [lines[end]]
        i = end + 1
    return "\n".join(out), changed


def stray_tables(text: str) -> list[str]:
    """Header lines of markdown tables outside the markers that are not in NOT_RESULTS."""
    out, inside, prev = [], False, ""
    for line in text.split("\n"):
        m = MARK.fullmatch(line.strip())
        if m:
            inside = not m.group(1)
        elif line.startswith("|") and not prev.startswith("|") and not inside and line.strip() not in NOT_RESULTS:
            out.append(line.strip())
        prev = line
    return out


# a decimal number in the prose (outside tables and code) and a results file named there
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
FILE = re.compile(r"[\w./*-]+\.(?:json|csv|log|txt)(?![\w])")
# the decimal numbers of the prose that are settings or definitions, not measurements
CONSTANTS = {
    "0.05": "RandomResizedCrop's smallest scale (the transforms)",
    "0.1": "the logit-norm temperature of SR²'s and InfLoRA's alignment; InfLoRA's mean-decay slope",
    "0.9": "InfLoRA's mean-decay floor",
    "0.95": "InfLoRA's memory threshold eps_0",
    "4.61": "ln 100, the loss of a uniform guess over 100 classes",
}


def prose_units(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each paragraph or bullet outside code blocks and tables."""
    units, cur, start, fence, inside = [], [], 0, False, False

    def flush():
        nonlocal cur
        if cur:
            units.append((start, " ".join(cur)))
        cur = []

    for i, line in enumerate(text.split("\n") + [""], 1):
        m = MARK.fullmatch(line.strip())
        if line.startswith("```") or m:
            fence = fence ^ line.startswith("```")
            inside = (not m.group(1)) if m else inside
            flush()
        elif fence or inside or line.startswith("|") or not line.strip() or line.lstrip().startswith("- "):
            flush()
            if not (fence or inside or line.startswith("|")) and line.strip():
                cur, start = [line], i
        else:
            cur, start = cur + [line], start if cur else i
    return units


def rounded(text: str) -> set[str]:
    """Every number of the text, and each decimal one rounded to fewer decimals: '0.1312' -> 0.1312, 0.131, 0.13, 0.1."""
    out = set()
    for tok in re.findall(r"\d+\.\d+e[+-]\d+|\d+\.\d+|\d+", text):
        mantissa, _, exp = tok.partition("e")  # 2.144e-01 -> 0.2144
        decimals = max(0, len(mantissa.partition(".")[2]) - int(exp or 0))
        out |= {tok, f"{float(tok):.{decimals}f}"} | {f"{float(tok):.{d}f}" for d in range(1, decimals)}
    return out


def unsourced(docs: dict[str, str], root: str) -> list[str]:
    """Each decimal number of the documents' prose that is in none of their generated tables, none of the
    results files its paragraph names and not in CONSTANTS: a number typed with no source to check it by."""
    tables = set()
    for text in docs.values():
        for body in re.findall(r"<!-- table:(\w+) -->\n(.*?)\n<!-- /table:\1 -->", text, flags=re.S):
            tables |= rounded(body[1])
    out = []
    for doc, text in docs.items():
        for line, unit in prose_units(text):
            known = set(tables)
            for name in FILE.findall(unit):
                for base in (root, os.path.join(root, "bench")):
                    for path in glob.glob(os.path.join(base, name)):
                        with open(path, errors="replace") as f:
                            known |= rounded(f.read())
            out += [f"{doc}:{line}: {n} is in no generated table, no results file the paragraph names, no CONSTANTS"
                    for n in NUMBER.findall(unit) if n not in known and n not in CONSTANTS]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of date")
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)  # the tests' copy of the tree
    p.add_argument("--skip-numbers", action="store_true",
                   help="do not check the prose's numbers against the tables (for trees whose results are fakes)")
    a = p.parse_args(argv)
    problems, docs = [], {}
    for doc in DOCS:
        path = os.path.join(a.root, doc)
        with open(path) as f:
            text = f.read()
        new, changed = rewrite(text, a.root, doc)
        problems += [f"{doc}: table '{n}' is out of date" for n in changed]
        problems += [f"{doc}: a results table outside the table markers: {h[:80]}" for h in stray_tables(text)]
        docs[doc] = new
        if not a.check and new != text:
            with open(path, "w") as f:
                f.write(new)
    summ = json.dumps(summary(a.root), indent=1) + "\n"
    spath = os.path.join(a.root, SUMMARY)
    old = open(spath).read() if os.path.isfile(spath) else None
    if old != summ:
        problems.append(f"{SUMMARY} is out of date")
        if not a.check:
            with open(spath, "w") as f:
                f.write(summ)
    if not a.skip_numbers:
        problems += unsourced(docs, a.root)
    if a.check:
        if any(cpu_runs(a.root).values()):
            problems += [f"{f} is missing (run python bench/table.py)" for f in FIGURES
                         if not os.path.isfile(os.path.join(a.root, f))]
        for line in problems:
            print(line)
        return 1 if problems else 0
    figures(a.root)
    hand = [line for line in problems if "outside the table markers" in line or "no CONSTANTS" in line]
    for line in hand:  # what the rewrite cannot fix
        print(line)
    return 1 if hand else 0


if __name__ == "__main__":
    sys.exit(main())
