#!/usr/bin/python3
"""Draws the loss curves of dion's demo (examples/00-demo-fashion-mnist) into a PNG.

    /usr/bin/python3 tools/plot_losses.py RESULTS.json OUT.png [--title TEXT]

RESULTS.json is what `dion_demo --out DIR` writes (DIR/results.json), or the same layout written by
the GPU example (`dion_example_gpu_training --out DIR`, examples/05-gpu-training), whose optional
"device" field names the GPU in the default title. Left: training loss (mean over
windows of `log_every` steps) against the optimizer step, log scale; right: test accuracy after each
epoch. Needs only matplotlib (Debian: python3-matplotlib, seen by /usr/bin/python3).
"""
import argparse
import json
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.json written by dion_demo")
    ap.add_argument("png", help="output PNG")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    with open(args.results, encoding="utf-8") as f:
        res = json.load(f)
    runs = res.get("runs", [])
    if not runs:
        print(f"plot_losses: no runs in {args.results}", file=sys.stderr)
        return 1

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for run in runs:
        label = run["label"]
        curve = run.get("curve", {})
        ax_loss.plot(curve.get("step", []), curve.get("train_loss", []), label=label, linewidth=1.3)
        epochs = run.get("epochs", [])
        ax_acc.plot([e["epoch"] for e in epochs], [100.0 * e["test_accuracy"] for e in epochs], marker="o",
                    label=f'{label} {100.0 * run["test_accuracy"]:.2f}%')

    cfg = res.get("config", {})
    ds = res.get("dataset", {})
    ax_loss.set_yscale("log")
    # Plain numbers on the log axis (a loss curve rarely spans a decade, so 10^k ticks alone say little).
    ys = [v for run in runs for v in run.get("curve", {}).get("train_loss", []) if v > 0]
    if ys:
        ticks = [t for t in (0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5) if min(ys) * 0.9 <= t <= max(ys) * 1.1]
        ax_loss.set_yticks(ticks)
        ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel(f'training loss (mean over {cfg.get("log_every", "?")} steps)')
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f'test accuracy (%), {ds.get("test", "?")} images')
    ax_acc.set_xticks(sorted({e["epoch"] for run in runs for e in run.get("epochs", [])}))
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize="small")
    title = args.title or (
        f'dion {res.get("dion_version", "")}: {res.get("model", "MLP")} on Fashion-MNIST '
        f'({ds.get("train", "?")} training images, batch {cfg.get("batch", "?")}, {res.get("device", "CPU")})'
    )
    fig.suptitle(textwrap.fill(title, 120))  # a long title (a GPU's name) takes two lines
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"plot_losses: wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
