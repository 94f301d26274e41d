"""
Draw runs from their log.jsonl into one PNG: training loss (smoothed) and validation loss against steps and
against wall time, validation bits per byte, learning rate, tokens/s and MFU, and the accuracies of BERT and
classifier runs. Runs are overlaid, each labelled with its folder name and the config keys on which the runs
differ (from each log's first record, the provenance: logger.py describes the records).

    python plot.py out                                  # -> out/plot.png
    python plot.py out-a out-b/log.jsonl --out=compare.png

A run still in progress is fine, and so is a line cut short by a killed run. Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import math
import os
import sys

from common import UserError

DPI, PANEL, LEGEND_ROW = 100, (5.0, 3.4), 0.22  # inches: 500 x 340 pixels per panel, three a row; the legend below
# keys that do not change the curves: left out of the labels
NOT_COMPARED = {"out_dir", "data_root", "init_from", "log_interval", "save_checkpoints", "checkpoint_interval",
                "checkpoint_every_minutes", "keep_last", "sample_every", "wandb_log", "wandb_project", "wandb_run_name",
                "tensorboard_dir"}
ACCURACIES = {"mlm_acc": "-", "nsp_acc": "--", "acc": ":"}  # linestyle of each


def read_log(path):
    """(provenance, training records, validation records) of a log.jsonl, the records as {step: record}. A
    resumed run's records replace the earlier ones from its first step on, and its elapsed_s continues the
    earlier run's time; a fresh run in the same folder starts the log over. Lines that are not JSON (a run
    killed mid-write) are skipped."""
    prov, train, val, elapsed, offset, resumed = None, {}, {}, 0.0, 0.0, False
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "config" in rec:  # a provenance record: a run starts, or a resumed one continues
                resumed = prov is not None and rec["config"].get("init_from") == "resume"
                if not resumed:
                    prov, train, val, elapsed = rec, {}, {}, 0.0
                offset = elapsed
                continue
            if "step" not in rec or ("loss" not in rec and "val_loss" not in rec):  # a sample
                continue
            if resumed:  # the resumed run's first record: what came after its checkpoint is trained again
                train, val = ({k: r for k, r in d.items() if k < rec["step"]} for d in (train, val))
                resumed = False
            if "elapsed_s" in rec:
                rec["elapsed_s"] += offset
                elapsed = max(elapsed, rec["elapsed_s"])
            (train if "loss" in rec else val)[rec["step"]] = rec
    if prov is None or not train and not val:
        raise UserError(f"{path} holds no records of a run yet")
    return prov, train, val


def load(path):
    """A run given as its folder or its log.jsonl: (folder, provenance, training records, validation records)."""
    log = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(log):
        raise UserError(f"no log.jsonl at {path}: give a run's out_dir or its log.jsonl")
    return (os.path.dirname(os.path.abspath(log)), *read_log(log))


def labels(runs):
    """Each run's folder name (its path where two names are the same) and the config values no other run shares."""
    names = [os.path.basename(folder) for folder, *_ in runs]
    if len(set(names)) < len(names):
        names = [os.path.relpath(folder) for folder, *_ in runs]
    configs = [prov["config"] for _, prov, *_ in runs]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c)
            if k not in NOT_COMPARED and len({json.dumps(c.get(k)) for c in configs}) > 1]
    out = []
    for name, c in zip(names, configs):
        diff = ", ".join(f"{k}={c.get(k)}" for k in keys)
        out.append(f"{name} ({diff[:70] + '...' if len(diff) > 73 else diff})" if diff else name)
    return out


def smooth(ys, frac=0.1):
    """An exponential moving average over about frac of the points, debiased at the start (as TensorBoard's)."""
    beta, avg, out = 1 - 1 / max(1.0, frac * len(ys)), 0.0, []
    for i, y in enumerate(ys, 1):
        avg = beta * avg + (1 - beta) * y
        out.append(avg / (1 - beta ** i))
    return out


def series(records, key, x="step"):
    """(xs, ys) of the records that have `key`, in step order; x is 'step' or 'minutes' (elapsed_s / 60)."""
    rows = [r for _, r in sorted(records.items()) if key in r and (x == "step" or "elapsed_s" in r)]
    return [r["step"] if x == "step" else r["elapsed_s"] / 60 for r in rows], [r[key] for r in rows]


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def plot(paths, out=None):
    """Draw the runs (folders or log.jsonl files) into one PNG at `out` (None: plot.png in the first run's folder);
    returns the matplotlib figure."""
    runs = [load(p) for p in paths]
    dots = lambda xs: {"marker": "o", "ms": 3} if len(xs) < 3 else {}  # a line of one or two points: show them
    plt = pyplot()
    has = lambda key: any(key in r for _, _, train, val in runs for r in [*train.values(), *val.values()])
    panels = (["loss", "loss_time"] + ["bpb"] * has("val_bpb") + ["lr", "tok_s", "mfu"]
              + ["acc"] * any(map(has, ACCURACIES)))
    rows, legend = math.ceil(len(panels) / 3), LEGEND_ROW * (len(runs) + 1)
    fig, axes = plt.subplots(rows, 3, figsize=(3 * PANEL[0], rows * PANEL[1] + legend), dpi=DPI, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((_, _, train, val), label) in enumerate(zip(runs, labels(runs))):
        c = colors[i % len(colors)]
        fig.legend(handles=[plt.Line2D([], [], color=c, lw=2)], labels=[label], loc="lower left", frameon=False,
                   fontsize=9,
                   bbox_to_anchor=(0.01, LEGEND_ROW * (len(runs) - i - 0.5) / fig.get_figheight()))
        for ax, panel in zip(axes.flat, panels):
            if panel in ("loss", "loss_time"):
                x = "step" if panel == "loss" else "minutes"
                xs, ys = series(train, "loss", x)
                ax.plot(xs, ys, color=c, alpha=0.2, lw=0.8)
                ax.plot(xs, smooth(ys), color=c, lw=1.5, label=label, **dots(xs))
                ax.plot(*series(val, "val_loss", x), "o--", color=c, ms=3, lw=0.8)
            elif panel == "bpb":
                ax.plot(*series(val, "val_bpb"), "o-", color=c, ms=3, lw=1.2)
            elif panel == "acc":
                for key, style in [(k, s) for k, s in ACCURACIES.items() if has(k)]:
                    xs, ys = series(train, key)
                    ax.plot(xs, smooth(ys), style, color=c, lw=1.5, **dots(xs))
                    ax.plot(*series(val, f"val_{key}"), "o", ls=style, color=c, ms=3, lw=0.8)
            else:
                xs, ys = series(train, panel)
                ax.plot(xs, [y * 100 for y in ys] if panel == "mfu" else ys, color=c, lw=1.2, **dots(xs))
    titles = {"loss": "loss (nats/token): training (smoothed), validation (dots)",
              "loss_time": "loss against wall time",
              "bpb": "validation bits per byte", "lr": "learning rate", "tok_s": "tokens/s", "mfu": "MFU (%)",
              "acc": "accuracy: training, validation (dots)"}
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(titles[panel], fontsize=10)
        ax.set_xlabel("minutes" if panel == "loss_time" else "step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if panel in ("loss", "loss_time"):
            ax.set_yscale("log")  # the first steps' loss would flatten the rest
            ax.yaxis.set_major_formatter("{x:.3g}")
            ax.yaxis.set_minor_formatter("{x:.3g}")
        if panel == "acc":  # which line is which metric
            ax.legend(handles=[plt.Line2D([], [], color="k", ls=s, label=k) for k, s in ACCURACIES.items() if has(k)],
                      fontsize=8)
    fig.tight_layout(rect=(0, legend / fig.get_figheight(), 1, 1))
    fig.savefig(out or os.path.join(runs[0][0], "plot.png"))
    return fig


def main(argv):
    """The command line; a user error is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(description="Draw runs' log.jsonl into one PNG.")
    parser.add_argument("runs", nargs="+", help="run folders (out_dir) or their log.jsonl files")
    parser.add_argument("--out", default=None, help="the PNG to write (default: plot.png in the first run's folder)")
    parser.error = lambda msg: sys.exit(print(f"plot.py: error: {msg}", file=sys.stderr) or 2)  # one line
    args = parser.parse_args(argv)
    try:
        out = args.out or os.path.join(load(args.runs[0])[0], "plot.png")
        plot(args.runs, out)
    except (UserError, OSError) as e:
        return print(f"plot.py: error: {e}", file=sys.stderr) or 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
