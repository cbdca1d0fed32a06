#!/usr/bin/python3
"""Draw dion's benchmark charts from the JSON lines of dion_cuda_bench / dion_cpu_bench.

    /usr/bin/python3 tools/plot_bench.py results.jsonl [more.jsonl ...] --out bench/plots

Writes, per shape set and dtype found among the "step" lines:
  step_time_<set>_<dtype>.png         median step time per optimizer (log scale), eager and graph,
                                      with the floor of PERFORMANCE.md §1 as a marker
  fraction_of_floor_<set>_<dtype>.png floor / median per optimizer (1.0 = at the physical limit)
and, from the "ortho" lines, ortho.png (orthogonalization time per shape and variant).
Needs Debian's python3-matplotlib (scripts/common.sh installs it); no other packages.
"""
import argparse
import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return rows


def label(r):
    v = r.get("variant") or ""
    tag = r["opt"] + (" [" + v + "]" if v and v not in ("symmetric", "own_qr_r") else "")
    if r.get("backend") == "eigen":
        tag += " (%d thr)" % r.get("threads", 1)
    return tag


def plot_steps(rows, out):
    groups = collections.defaultdict(list)
    for r in rows:
        if r.get("bench") == "step":
            groups[(r.get("backend", "cuda"), r["set"], r["dtype"])].append(r)
    made = []
    for (backend, s, dt), rs in sorted(groups.items()):
        eager = [r for r in rs if r.get("mode", "eager") == "eager"]
        graph = {label(r): r for r in rs if r.get("mode") == "graph"}
        names = [label(r) for r in eager]
        t = [r["median_ms"] for r in eager]
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4.5))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], t, 0.4, label="eager, median")
        if graph:
            ax.bar([i + 0.2 for i in x], [graph[n]["median_ms"] if n in graph else 0 for n in names], 0.4,
                   label="CUDA graph, median")
        fl = [r.get("floor_ms") for r in eager]
        if any(f for f in fl):
            ax.scatter(list(x), [f if f else float("nan") for f in fl], marker="_", s=400, color="k", zorder=3,
                       label="floor (PERFORMANCE.md §1)")
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per optimizer step")
        dev = eager[0].get("gpu", "CPU") if eager else ""
        ax.set_title("%s %s params, %s backend (%s)" % (s, dt, backend, dev), fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fn = os.path.join(out, "step_time_%s_%s_%s.png" % (backend, s, dt))
        fig.savefig(fn, dpi=110)
        plt.close(fig)
        made.append(fn)
        ff = [(label(r), r["fraction_of_floor"]) for r in eager if r.get("fraction_of_floor") is not None]
        if ff:
            fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(ff) + 2), 4))
            ax.bar(range(len(ff)), [v for _, v in ff])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(len(ff)))
            ax.set_xticklabels([n for n, _ in ff], rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("floor / median (1 = at the floor)")
            ax.set_ylim(0, max(1.05, max(v for _, v in ff) * 1.1))
            ax.set_title("fraction of the floor: %s %s, %s" % (s, dt, backend), fontsize=10)
            fig.tight_layout()
            fn = os.path.join(out, "fraction_of_floor_%s_%s_%s.png" % (backend, s, dt))
            fig.savefig(fn, dpi=110)
            plt.close(fig)
            made.append(fn)
    return made


def plot_ortho(rows, out):
    rs = [r for r in rows if r.get("bench") == "ortho" and r.get("backend", "cuda") == "cuda"]
    if not rs:
        return []
    shapes = []
    for r in rs:
        if r["what"] not in shapes:
            shapes.append(r["what"])
    variants = []
    for r in rs:
        if r.get("variant") not in variants:
            variants.append(r.get("variant"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.8 / max(1, len(variants))
    for vi, v in enumerate(variants):
        ys = []
        for s in shapes:
            m = [r["median_ms"] for r in rs if r["what"] == s and r.get("variant") == v]
            ys.append(m[0] if m else 0)
        ax.bar([i + (vi - (len(variants) - 1) / 2) * w for i in range(len(shapes))], ys, w, label=v)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([s.replace("polar_express ", "") for s in shapes], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title("One Polar Express orthogonalization (5 iterations) on %s" % rs[0].get("gpu", "GPU"), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fn = os.path.join(out, "ortho.png")
    fig.savefig(fn, dpi=110)
    plt.close(fig)
    return [fn]


def table(rows):
    """Markdown table of the step lines (eager, and graph where present)."""
    out = ["| set | dtype | optimizer | variant | median ms (eager / graph) | first ms | TFLOP/s | GB/s | floor ms | of floor | state MB | workspace MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    graph = {(r.get("backend"), r["set"], r["dtype"], r["opt"], r.get("variant"), r.get("threads")): r
             for r in rows if r.get("bench") == "step" and r.get("mode") == "graph"}
    for r in rows:
        if r.get("bench") != "step" or r.get("mode") == "graph":
            continue
        g = graph.get((r.get("backend"), r["set"], r["dtype"], r["opt"], r.get("variant"), r.get("threads")))
        med = "%.3g" % r["median_ms"] + (" / %.3g" % g["median_ms"] if g else "")
        if r.get("reps", 20) < 20:
            med += " (%d reps)" % r["reps"]
        var = r.get("variant") or ""
        if r.get("backend") == "eigen":
            var = "%d thread(s)" % r.get("threads", 1)
        tf = r.get("tflops_full_count")
        out.append("| %s | %s | %s | %s | %s | %.3g | %s | %s | %s | %s | %.0f | %.0f |" % (
            r["set"], r["dtype"], r["opt"], var, med, r.get("first_ms", 0),
            ("%.0f" % tf) if tf else "", ("%.0f" % r["gbs"]) if r.get("gbs") else "",
            ("%.3g" % r["floor_ms"]) if r.get("floor_ms") else "",
            ("%.3f" % r["fraction_of_floor"]) if r.get("fraction_of_floor") else "",
            r.get("state_bytes", 0) / 1e6, r.get("workspace_bytes", 0) / 1e6))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", default="bench/plots")
    ap.add_argument("--table", action="store_true", help="print a markdown table of the step results instead")
    a = ap.parse_args()
    rows = load(a.inputs)
    if not rows:
        print("no JSON lines in", a.inputs, file=sys.stderr)
        return 1
    if a.table:
        print(table(rows))
        return 0
    os.makedirs(a.out, exist_ok=True)
    for fn in plot_steps(rows, a.out) + plot_ortho(rows, a.out):
        print(fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
