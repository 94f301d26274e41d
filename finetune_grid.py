"""
The fine-tune grid: does pretraining make the task easier? Fine-tunes a demo task from a pretrained checkpoint
and from scratch, on 1%, 10% and 100% of its training examples (train.py's label_fraction: nested subsets, drawn
per seed), with 3 seeds each, every run with the same budget, and prints one table per task. The tasks (--task):

    classify    BERT: which stdlib package is a snippet from (config/finetune_classify.py), validation accuracy;
                pretrained by MLM+NSP (config/bert_quickstart.py: out-bert/best.pt)
    params      T5: a function's header -> its parameter names (config/t5_seq2seq.py), validation exact match
    docstrings  T5: a function's source -> its docstring's first sentence (config/t5_docstrings.py), ROUGE-L;
                both pretrained by span corruption (config/t5_span.py: out-t5-span/best.pt)

    python finetune_grid.py                                   # pretrains out-bert first if it has no best.pt
    python finetune_grid.py --ckpt=out-bert/best.pt --workers=2 --json=grid.json
    python finetune_grid.py --task=params,docstrings --workers=2   # both T5 tasks, one span pretraining
    python finetune_grid.py --seeds=1 --fractions=0.1 --max_iters=100   # train.py keys override the config's

Without --ckpt, the checkpoint is the pretraining config's out_dir/best.pt, made first if missing (its time is
reported apart; one pretraining serves the tasks that share it). --workers=N runs N fine-tunes at a time, one CPU
thread each. Runs write to --out_dir/INIT-FRACTION-SEED (for the T5 tasks TASK-INIT-FRACTION-SEED; no
checkpoints); each reports its validation metrics at its last step (for the T5 tasks ROUGE over every
validation pair: eval_rouge, pip install rouge-score).
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
import optim
import prepare
import train
from common import UserError

INITS = ("pretrained", "scratch")
NAMES = {"acc": "acc", "exact_match": "exact match", "rougeL": "ROUGE-L"}  # the metrics as the tables name them
TASKS = {  # --task: (its fine-tune config, the config that pretrains its checkpoint, the metric of its table)
    "classify": ("config/finetune_classify.py", "config/bert_quickstart.py", "acc"),
    "params": ("config/t5_seq2seq.py", "config/t5_span.py", "exact_match"),
    "docstrings": ("config/t5_docstrings.py", "config/t5_span.py", "rougeL"),
}


def parse_args(argv):
    """The grid's own options, and the rest (--key=value) as train.py overrides for every fine-tune."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="classify", help=f"the demo task(s), comma-separated: {', '.join(TASKS)}")
    p.add_argument("--config", default=None, help="the fine-tune config of every run (default: the task's)")
    p.add_argument("--ckpt", default=None,
                   help="the pretrained checkpoint (default: the pretraining's best.pt, made if missing)")
    p.add_argument("--pretrain_config", default=None,
                   help="pretrains the checkpoint when it is missing (default: the task's)")
    p.add_argument("--fractions", default="0.01,0.1,1",
                   help="shares of the labelled training examples, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per (init, fraction): 1337, 1338, ...")
    p.add_argument("--workers", type=int, default=1, help="fine-tunes at a time, one CPU thread each when > 1")
    p.add_argument("--out_dir", default="out-grid", help="the runs' folders go under it")
    p.add_argument("--json", default=None, help="also write the runs and the table's rows to this file")
    args, overrides = p.parse_known_args(argv)
    fractions, args.tasks = [float(f) for f in args.fractions.split(",")], args.task.split(",")
    if not all(0 < f <= 1 for f in fractions) or args.seeds < 1 or args.workers < 1:
        raise UserError("--fractions must be in (0, 1], --seeds and --workers >= 1")
    if not set(args.tasks) <= set(TASKS) or len(set(args.tasks)) < len(args.tasks):
        raise UserError(f"--task={args.task}: give one or more of {', '.join(TASKS)}, comma-separated, each once")
    if len(args.tasks) > 1 and (args.config or args.pretrain_config):
        raise UserError("--config and --pretrain_config name one task's configs: give them with one --task")
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        raise UserError(f"unknown argument(s) {bad}: the grid's options are in --help, train.py keys are --key=value")
    return args, fractions, overrides


def configs(args, task):
    """(fine-tune config, pretraining config) of a task: --config and --pretrain_config, or the task's own."""
    return args.config or TASKS[task][0], args.pretrain_config or TASKS[task][1]


def pretrain(args, overrides, pretrain_config):
    """The checkpoint to fine-tune from: --ckpt, or the pretraining config's out_dir/best.pt, pretrained first if
    missing. (path, seconds)."""
    if args.ckpt:
        return args.ckpt, 0.0
    keep = ("--threads", "--device", "--data_root")
    cfg = train.get_config([pretrain_config] + [o for o in overrides if o.split("=")[0] in keep])
    path = Path(cfg["out_dir"]) / "best.pt"
    if path.exists():
        return str(path), 0.0
    print(f"pretraining {path} with {pretrain_config} (once)", flush=True)
    t0 = time.time()
    train.train(cfg)
    return str(path), time.time() - t0


def finetune(argv):
    """One fine-tune (in a worker process): its validation metrics at its last step ("acc" or "rougeL"...,
    "loss") and "wall_s"."""
    s = train.train(train.get_config(argv))
    return dict(s["metrics"], wall_s=s["wall_s"])


def show(metric, value):
    """A metric as the tables print it: accuracy (0-1) and exact match (0-100) in percent, ROUGE in points."""
    return f"{100 * value:.1f}%" if metric == "acc" else f"{value:.1f}%" if metric == "exact_match" else f"{value:.1f}"


def run_grid(args, fractions, overrides, ckpts):
    """Every (task, init, fraction, seed) fine-tune, `args.workers` at a time; ckpts: {task: its checkpoint}.
    Returns [(task, init, fraction, seed, result)]."""
    seeds = [1337 + i for i in range(args.seeds)]
    runs = [(task, init, f, seed) for task in args.tasks for f in fractions for init in INITS for seed in seeds]
    threads = ["--threads=1"] if args.workers > 1 else []
    argvs = []
    for task, init, f, seed in runs:
        config = configs(args, task)[0]
        last = f"--eval_interval={train.get_config([config, *overrides])['max_iters']}"  # at the end only (and 0)
        folder = f"{init}-{f:g}-{seed}" if task == "classify" else f"{task}-{init}-{f:g}-{seed}"
        init_from = ckpts[task] if init == "pretrained" else "scratch"
        argvs.append([config, *threads, *overrides, last, f"--init_from={init_from}", f"--label_fraction={f}",
                      f"--seed={seed}", "--save_checkpoints=False", f"--out_dir={Path(args.out_dir) / folder}"])
    for a in argvs:  # every config checked before the first run starts
        train.get_config(a)
    for task in args.tasks:  # the built-in task: here, not in two workers at once
        cfg = train.get_config([configs(args, task)[0], *overrides])
        if not (Path(cfg["data_root"]) / cfg["dataset"] / "meta.json").exists():
            prepare.prepare(name=cfg["dataset"], tokenizer=cfg["tokenizer"], out_dir=cfg["data_root"])
    spawn = multiprocessing.get_context("spawn")  # not fork: each worker starts clean of this process's threads
    with ProcessPoolExecutor(args.workers, mp_context=spawn) if args.workers > 1 else nullcontext() as pool:
        results = []
        for (task, init, f, seed), res in zip(runs, pool.map(finetune, argvs) if pool else map(finetune, argvs)):
            metric = TASKS[task][2]
            print(f"{'' if task == 'classify' else task + ' '}{init} {100 * f:g}% seed {seed}: val {NAMES[metric]} "
                  f"{show(metric, res[metric])} ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            results.append((task, init, f, seed, res))
    return results


def table(task, runs, cfg, meta):
    """One task's grid as text (a header, a row per (init, fraction), the differences) and as rows for --json;
    runs: [(init, fraction, seed, result)]."""
    metric, fractions = TASKS[task][2], sorted({f for _, f, _, _ in runs})
    lr = f"learning rate {cfg['learning_rate']:g}"
    if metric == "acc":
        val = np.load(Path(cfg["data_root"]) / cfg["dataset"] / "val_labels.npy")
        n_train, majority = meta["train_docs"], np.bincount(val).max() / len(val)
        budget = (f"{cfg['max_iters']} steps of batch {cfg['batch_size']} x {cfg['seq_len']} tokens, {lr} "
                  f"(warmup {cfg['warmup_iters']}, cosine to {cfg['min_lr']:g}; the head at {cfg['head_lr_mult']:g}x), "
                  f"dropout {cfg['dropout']}")
        lines = [f"fine-tune grid: {cfg['dataset']}, {len(meta['labels'])} labels, {len(val):,} validation snippets "
                 f"(majority class {100 * majority:.1f}%); every run: {budget}",
                 f"{'init':<11} {'labels':>15} {'steps':>6} {'val acc':>8} {'min-max':>13} {'seeds':>5}"]
    else:
        n_train, optimizer = meta["train_docs"] // 2, optim.optimizer_of(cfg)
        budget = (f"{cfg['max_iters']} steps of batch {cfg['batch_size']} x {cfg['seq_len']}+"
                  f"{cfg['dec_len'] or cfg['seq_len']} tokens, {optimizer} {lr}"
                  + (f" (Muon {cfg['muon_lr']:g})" if optimizer == "muon" else "")
                  + f", warmup {cfg['warmup_iters']}, {cfg['lr_schedule']} to {cfg['min_lr']:g}")
        lines = [f"fine-tune grid: {cfg['dataset']}, {n_train:,} training pairs, {meta['val_docs'] // 2:,} validation "
                 f"pairs (ROUGE over all, greedy); every run: {budget}",
                 f"{'init':<11} {'pairs':>15} {'steps':>6} {NAMES[metric]:>11} {'min-max':>11} {'ROUGE-1/2/L':>16} "
                 f"{'exact':>6} {'seeds':>5}"]
    rows, means = [], {}
    for f in fractions:
        k = len(data.label_subset(n_train, f, 0))  # the same size for every seed
        for init in INITS:
            res = [r for i, g, _, r in runs if (i, g) == (init, f)]
            vals = [100 * r["acc"] if metric == "acc" else r[metric] for r in res]
            means[init, f] = statistics.mean(vals)
            row = dict(task=task, init=init, fraction=f, examples=k, steps=cfg["max_iters"], mean=means[init, f],
                       min=min(vals), max=max(vals), **{"accs" if metric == "acc" else "values": vals})
            if metric == "acc":
                lines.append(f"{init:<11} {f'{100 * f:g}% ({k:,})':>15} {cfg['max_iters']:>6} {means[init, f]:>7.1f}% "
                             f"{f'{min(vals):.1f}-{max(vals):.1f}%':>13} {len(vals):>5}")
            else:  # (the means of the other metrics too)
                row.update({m: statistics.mean(r[m] for r in res)
                            for m in ("rouge1", "rouge2", "rougeL", "exact_match")})
                rouge = f"{row['rouge1']:.1f}/{row['rouge2']:.1f}/{row['rougeL']:.1f}"
                lines.append(f"{init:<11} {f'{100 * f:g}% ({k:,})':>15} {cfg['max_iters']:>6} "
                             f"{show(metric, means[init, f]):>11} {f'{min(vals):.1f}-{max(vals):.1f}':>11} {rouge:>16} "
                             f"{row['exact_match']:>5.1f}% {len(vals):>5}")
            rows.append(row)
    diff = ", ".join(f"{100 * f:g}% {means['pretrained', f] - means['scratch', f]:+.1f}" for f in fractions)
    lines.append(f"pretrained - scratch, points of mean {'accuracy' if metric == 'acc' else NAMES[metric]}: {diff}")
    return "\n".join(lines), rows


def main(argv):
    try:
        args, fractions, overrides = parse_args(argv)
        ckpts, made, pretrain_s = {}, {}, 0.0
        for task in args.tasks:  # one pretraining for the tasks that share it
            pre = configs(args, task)[1]
            if pre not in made:
                made[pre], seconds = pretrain(args, overrides, pre)
                pretrain_s += seconds
            ckpts[task] = made[pre]
            if not os.path.exists(ckpts[task]):
                raise UserError(f"no checkpoint {ckpts[task]}: give --ckpt=PATH of a pretraining run's best.pt "
                                f"({TASKS[task][1]})")
        t0 = time.time()
        runs = run_grid(args, fractions, overrides, ckpts)
        wall_s, texts, rows, cfgs = time.time() - t0, [], [], {}
        for task in args.tasks:
            cfgs[task] = cfg = train.get_config([configs(args, task)[0], *overrides])
            text, task_rows = table(task, [r[1:] for r in runs if r[0] == task], cfg,
                                    data.load_meta(Path(cfg["data_root"]) / cfg["dataset"]))
            texts.append(text)
            rows += task_rows
    except UserError as e:
        return print(f"finetune_grid.py: error: {e}", file=sys.stderr) or 2
    print("\n\n".join(texts))
    print(f"wall time: {wall_s / 60:.1f} min for {len(runs)} fine-tunes"
          + (f", plus {pretrain_s / 60:.1f} min pretraining" if pretrain_s else ""))
    if args.json:
        first = args.tasks[0]
        out = {"ckpt": ckpts[first], "config": cfgs[first], "rows": rows, "pretrain_s": pretrain_s, "wall_s": wall_s,
               "ckpts": ckpts, "configs": cfgs,
               "runs": [dict(task=t, init=i, fraction=f, seed=s, **r) for t, i, f, s, r in runs]}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
