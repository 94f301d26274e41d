"""
The fine-tune grid: does MLM+NSP pretraining make the labelled task easier? Fine-tunes the demo task
(config/finetune_classify.py: which stdlib package is a snippet from) from a pretrained checkpoint and from
scratch, on 1%, 10% and 100% of the labelled training examples (train.py's label_fraction: nested subsets,
drawn per seed), with 3 seeds each, every run with the same budget, and prints one table.

    python finetune_grid.py                                   # pretrains out-bert first if it has no best.pt
    python finetune_grid.py --ckpt=out-bert/best.pt --workers=2 --json=grid.json
    python finetune_grid.py --seeds=1 --fractions=0.1 --max_iters=100   # train.py keys override the config's

Without --ckpt, the checkpoint is out-bert/best.pt, made first with config/bert_quickstart.py if missing (its
time is reported apart). --workers=N runs N fine-tunes at a time, one CPU thread each. Runs write to
--out_dir/INIT-FRACTION-SEED (no checkpoints); each reports the validation accuracy at its last step.
"""
import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np

import data
import prepare
import train
from common import UserError

INITS = ("pretrained", "scratch")


def parse_args(argv):
    """The grid's own options, and the rest (--key=value) as train.py overrides for every fine-tune."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/finetune_classify.py", help="the fine-tune config of every run")
    p.add_argument("--ckpt", default=None, help="the pretrained checkpoint (default: out-bert/best.pt, made if missing)")
    p.add_argument("--pretrain_config", default="config/bert_quickstart.py", help="pretrains the checkpoint when it is missing")
    p.add_argument("--fractions", default="0.01,0.1,1", help="shares of the labelled training examples, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per (init, fraction): 1337, 1338, ...")
    p.add_argument("--workers", type=int, default=1, help="fine-tunes at a time, one CPU thread each when > 1")
    p.add_argument("--out_dir", default="out-grid", help="the runs' folders go under it")
    p.add_argument("--json", default=None, help="also write the runs and the table's rows to this file")
    args, overrides = p.parse_known_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    if not all(0 < f <= 1 for f in fractions) or args.seeds < 1 or args.workers < 1:
        raise UserError("--fractions must be in (0, 1], --seeds and --workers >= 1")
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        raise UserError(f"unknown argument(s) {bad}: the grid's options are in --help, train.py keys are --key=value")
    return args, fractions, overrides


def pretrain(args, overrides):
    """The checkpoint to fine-tune from: --ckpt, or out-bert/best.pt, pretrained first if missing. (path, seconds)."""
    if args.ckpt:
        return args.ckpt, 0.0
    cfg = train.get_config([args.pretrain_config] + [o for o in overrides if o.split("=")[0] in ("--threads", "--device", "--data_root")])
    path = Path(cfg["out_dir"]) / "best.pt"
    if path.exists():
        return str(path), 0.0
    print(f"pretraining {path} with {args.pretrain_config} (once)", flush=True)
    t0 = time.time()
    train.train(cfg)
    return str(path), time.time() - t0


def finetune(argv):
    """One fine-tune (in a worker process): {"acc", "loss", "wall_s"} at its last step."""
    s = train.train(train.get_config(argv))
    return {"acc": s["metrics"]["acc"], "loss": s["metrics"]["loss"], "wall_s": s["wall_s"]}


def run_grid(args, fractions, overrides, ckpt):
    """Every (init, fraction, seed) fine-tune, `args.workers` at a time. Returns [(init, fraction, seed, result)]."""
    seeds = [1337 + i for i in range(args.seeds)]
    runs = [(init, f, seed) for f in fractions for init in INITS for seed in seeds]
    threads = ["--threads=1"] if args.workers > 1 else []
    last = f"--eval_interval={train.get_config([args.config, *overrides])['max_iters']}"  # evaluate at the end only (and at step 0)
    argvs = [[args.config, *threads, *overrides, last, f"--init_from={ckpt if init == 'pretrained' else 'scratch'}",
              f"--label_fraction={f}", f"--seed={seed}", "--save_checkpoints=False",
              f"--out_dir={Path(args.out_dir) / f'{init}-{f:g}-{seed}'}"] for init, f, seed in runs]
    for a in argvs:  # every config checked before the first run starts
        train.get_config(a)
    cfg = train.get_config(argvs[0])
    if not (Path(cfg["data_root"]) / cfg["dataset"] / "meta.json").exists():  # the built-in task: here, not in two workers at once
        prepare.prepare(name=cfg["dataset"], tokenizer=cfg["tokenizer"], out_dir=cfg["data_root"])
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) if args.workers > 1 else nullcontext() as pool:
        results = []  # spawn, not fork: each worker starts clean of this process's torch threads
        for (init, f, seed), res in zip(runs, pool.map(finetune, argvs) if pool else map(finetune, argvs)):
            print(f"{init} {100 * f:g}% seed {seed}: val acc {100 * res['acc']:.1f}% ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            results.append((init, f, seed, res))
    return results


def table(runs, cfg, meta, n_train, pretrain_s, wall_s):
    """The grid as text (a header, a row per (init, fraction), the differences) and as rows for --json."""
    val = np.load(Path(cfg["data_root"]) / cfg["dataset"] / "val_labels.npy")
    majority = np.bincount(val).max() / len(val)
    budget = (f"{cfg['max_iters']} steps of batch {cfg['batch_size']} x {cfg['seq_len']} tokens, learning rate {cfg['learning_rate']:g} "
              f"(warmup {cfg['warmup_iters']}, cosine to {cfg['min_lr']:g}; the head at {cfg['head_lr_mult']:g}x), dropout {cfg['dropout']}")
    lines = [f"fine-tune grid: {cfg['dataset']}, {len(meta['labels'])} labels, {len(val):,} validation snippets "
             f"(majority class {100 * majority:.1f}%); every run: {budget}",
             f"{'init':<11} {'labels':>15} {'steps':>6} {'val acc':>8} {'min-max':>13} {'seeds':>5}"]
    rows, means = [], {}
    for f in sorted({f for _, f, _, _ in runs}):
        k = len(data.label_subset(n_train, f, 0))  # the same size for every seed
        for init in INITS:
            accs = [100 * r["acc"] for i, g, _, r in runs if (i, g) == (init, f)]
            means[init, f] = statistics.mean(accs)
            rows.append(dict(init=init, fraction=f, examples=k, steps=cfg["max_iters"], mean=means[init, f], min=min(accs), max=max(accs), accs=accs))
            lines.append(f"{init:<11} {f'{100 * f:g}% ({k:,})':>15} {cfg['max_iters']:>6} {means[init, f]:>7.1f}% "
                         f"{f'{min(accs):.1f}-{max(accs):.1f}%':>13} {len(accs):>5}")
    diff = ", ".join(f"{100 * f:g}% {means['pretrained', f] - means['scratch', f]:+.1f}" for f in sorted({f for _, f, _, _ in runs}))
    lines.append(f"pretrained - scratch, points of mean accuracy: {diff}")
    lines.append(f"wall time: {wall_s / 60:.1f} min for {len(runs)} fine-tunes" + (f", plus {pretrain_s / 60:.1f} min pretraining" if pretrain_s else ""))
    return "\n".join(lines), rows


def main(argv):
    try:
        args, fractions, overrides = parse_args(argv)
        ckpt, pretrain_s = pretrain(args, overrides)
        if not os.path.exists(ckpt):
            raise UserError(f"no checkpoint {ckpt}: give --ckpt=PATH of an MLM+NSP run's best.pt")
        cfg = train.get_config([args.config, *overrides])
        t0 = time.time()
        runs = run_grid(args, fractions, overrides, ckpt)
        meta = data.load_meta(Path(cfg["data_root"]) / cfg["dataset"])
        text, rows = table(runs, cfg, meta, meta["train_docs"], pretrain_s, time.time() - t0)
    except UserError as e:
        return print(f"finetune_grid.py: error: {e}", file=sys.stderr) or 2
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": ckpt, "config": cfg, "rows": rows, "pretrain_s": pretrain_s,
                                               "runs": [dict(init=i, fraction=f, seed=s, **r) for i, f, s, r in runs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
