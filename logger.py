"""
Watching a run: the console, out_dir/log.jsonl and the optional wandb and TensorBoard sinks, from rank 0 only;
every record goes to each of them. log.jsonl opens with the run's provenance (torch, device, world, git commit
and the settled config: common.provenance), then one record per log line:

    training     {"step", "lr", "tok_s", "mfu", "ms_step", "eta_s", "elapsed_s", and the step's numbers: "loss",
                 "grad_norm" and the objective's metrics (mlm_acc, ...), each the mean over the steps since the
                 last record (train.forward_backward returns them: a new one is a line there)}
    evaluation   {"step", "val_loss", "val_<metric>" (mlm_acc, ...), "val_bpb" (clm), "elapsed_s"}
    sample       {"step", "sample"}: the model's output on a fixed validation example (sample_every)

A resumed run appends its own provenance and records to the same file (plot.py reads them as one run).
Bits per byte (val_bpb) is the validation loss in nats per token times the validation split's tokens per UTF-8
byte (meta.json's val_tokens / val_bytes), over ln 2: comparable across tokenizers.
"""
import importlib.util
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import torch

import data
from common import UserError, atomic_write, flops_per_token, mfu, peak_flops, state_bytes, unsharded_grads
from tokenizer import get_tokenizer_from_meta


def check_logging(cfg):
    """The logging keys, before any work: a sink's package must be installed."""
    for key, package in (("wandb_log", "wandb"), ("tensorboard_dir", "tensorboard")):
        if cfg[key] and importlib.util.find_spec(package) is None:
            raise UserError(f"{key}={cfg[key]!r} needs the {package} package: pip install {package}")


def log(rt, msg):
    if rt.master:
        print(msg, flush=True)


def log_record(rt, cfg, rec, sinks=()):
    """One record: a line of out_dir/log.jsonl, then each sink."""
    if rt.master:
        with open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        for sink in sinks:
            sink(rec)


@dataclass
class Meter:
    """What the log keeps between records: the step time's moving average and the sums of the steps' numbers
    since the last log line, the sinks, the validation split's tokens per byte, and sample_every's example."""
    tokens_per_step: int
    flops_per_token: float
    peak: float
    t0: float = field(default_factory=time.time)
    dt_ema: float | None = None
    sums: dict = field(default_factory=dict)
    steps: int = 0
    sinks: list = field(default_factory=list)
    tokens_per_byte: float | None = None
    example: tuple | None = None  # (the validation split's row 0, the tokenizer, meta.json, the objective's show)


def log_start(s, rt, run, sinks=()):
    """The settled config, the model, run, device and memory lines; the provenance record opens log.jsonl (and
    is the sinks' config). Returns the Meter the later records go through."""
    cfg = run.cfg
    if rt.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    log(rt, json.dumps(cfg))  # the settled config: 'auto' and None replaced by what they became
    log(rt, f"model {cfg['model']}: {s.raw.num_params():,} parameters; {asdict(run.mcfg)}")
    lrs = [f"{opt} at {cfg['muon_lr' if opt == 'muon' else 'learning_rate']:g}" for opt in
           (["muon"] if cfg["optimizer"] == "muon" else []) + ["adamw"]]
    log(rt, f"objective {cfg['objective']} on {cfg['dataset']}; optimizer {' + '.join(lrs)}, {cfg['lr_schedule']} to "
            f"{cfg['min_lr']:g} at step {cfg['lr_decay_iters']} after {cfg['warmup_iters']} warmup steps"
        + "".join(f"; {note}" for note in run.notes))
    log_record(rt, cfg, run.provenance, sinks)
    peak, peak_src = peak_flops(rt.device, rt.dtype)
    T, D = cfg["seq_len"], cfg["dec_len"]  # an encoder-decoder's row: T source + D target tokens
    meter = Meter(cfg["batch_size"] * cfg["gradient_accumulation_steps"] * rt.world * (T + D),
                  flops_per_token(run.mcfg, T, dec_len=D or None), peak, sinks=list(sinks))
    # bits per byte where the loss is a code length of the whole text (clm). MLM's loss is over the 15% masked
    # tokens, each seen with both sides' context, and classify's is per example: neither measures the text's bytes.
    if run.obj.bits_per_byte and run.meta.get("val_bytes"):
        meter.tokens_per_byte = run.meta["val_tokens"] / run.meta["val_bytes"]
    if cfg["sample_every"]:
        meter.example = (run.obj.batch(run.splits[1], range(1), 1), get_tokenizer_from_meta(run.meta), run.meta,
                         run.obj.show)
    tf32 = " (TF32 matmuls)" if rt.device.type == "cuda" and rt.dtype == torch.float32 else ""
    log(rt, f"device {rt.device} {str(rt.dtype).split('.')[-1]}{tf32}, parallel={rt.parallel} world={rt.world}, "
        f"{meter.tokens_per_step:,} tokens/step, MFU vs {peak / 1e12:.2f} TFLOP/s ({peak_src})")
    state = state_bytes(s.raw.num_params(), rt.world, rt.parallel, unsharded_grads(cfg, rt.parallel))
    log(rt, "per-rank memory estimate: " + ", ".join(f"{k} {b / 2**30:.2f} GiB" for k, b in state.items())
        + " + activations")
    return meter


def log_step(s, cfg, rt, meter, stats, lr, dt):
    """Add the step's numbers (stats: {name: host float}); every log_interval steps, the console line and a
    log.jsonl record of their means since the last one, lr, tok/s, MFU and ETA; every sample_every steps, a
    sample."""
    meter.dt_ema = dt if meter.dt_ema is None else 0.9 * meter.dt_ema + 0.1 * dt
    meter.sums = {k: meter.sums.get(k, 0.0) + v for k, v in stats.items()}
    meter.steps += 1
    if cfg["sample_every"] and s.step % cfg["sample_every"] == 0:
        log_sample(s, cfg, rt, meter)
    if s.step % cfg["log_interval"] and s.step != cfg["max_iters"]:
        return
    means = {k: v / meter.steps for k, v in meter.sums.items()}
    meter.sums, meter.steps = {}, 0
    tok_s = meter.tokens_per_step / meter.dt_ema
    util, eta = mfu(meter.flops_per_token, tok_s, meter.peak, rt.world), meter.dt_ema * (cfg["max_iters"] - s.step)
    log_record(rt, cfg, {"step": s.step, **{k: round(v, 4) for k, v in means.items()}, "lr": lr, "tok_s": round(tok_s),
                         "mfu": round(util, 4), "ms_step": round(meter.dt_ema * 1000, 1), "eta_s": round(eta),
                         "elapsed_s": round(time.time() - meter.t0, 1)}, meter.sinks)
    mem = (f", peak memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB allocated "
           f"{torch.cuda.max_memory_reserved(rt.device) / 2**30:.1f} reserved" if rt.device.type == "cuda" else "")
    log(rt, f"step {s.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + f", lr {lr:.2e}, "
            f"{tok_s:,.0f} tok/s, MFU {util:.1%}, {meter.dt_ema * 1000:.1f} ms/step, ETA {eta / 60:.1f} min{mem}")


def log_eval(s, cfg, rt, meter, metrics, improved):
    """An evaluation's log line and record: the validation loss, the head's parts, bits per byte (clm)."""
    val_loss, parts = metrics["loss"], {k: v for k, v in metrics.items() if k != "loss"}
    if meter.tokens_per_byte:
        parts["bpb"] = val_loss * meter.tokens_per_byte / math.log(2)
    log(rt, f"step {s.step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})"
        + "".join(f", {k} {v:.4f}" for k, v in parts.items()) + f"{' best' if improved else ''}")
    log_record(rt, cfg, {"step": s.step, "val_loss": val_loss, **{f"val_{k}": v for k, v in parts.items()},
                         "elapsed_s": round(time.time() - meter.t0, 1)}, meter.sinks)


@torch.no_grad()
def log_sample(s, cfg, rt, meter):
    """The model on the fixed validation example, into the log, as the objective shows it (data.py): clm continues
    it greedily, mlm_nsp fills in its masked tokens, classify names its label, span and seq2seq write the decoder's
    greedy output. Every rank runs the model (under FSDP each holds only a shard of it); rank 0 writes."""
    batch, tok, meta, show = meter.example
    s.model.eval()
    with rt.autocast():
        text = show(s.raw, data.to_device(batch, rt.device), batch, tok, meta)
    s.model.train()
    log(rt, f"step {s.step}: sample {text}")
    log_record(rt, cfg, {"step": s.step, "sample": text}, meter.sinks)


# -----------------------------------------------------------------------------------------------
# sinks: each a function that takes a record, open for the run (rank 0 only)

@contextmanager
def open_sinks(cfg, rt, run):
    """The sinks the config asks for, closed when the run ends (also on an error)."""
    with ExitStack() as stack:
        sinks = []
        if rt.master and cfg["wandb_log"]:
            sinks.append(stack.enter_context(wandb_sink(cfg, run.resuming)))
        if rt.master and cfg["tensorboard_dir"]:
            sinks.append(stack.enter_context(tensorboard_sink(cfg["tensorboard_dir"],
                                                              run.ckpt["step"] + 1 if run.resuming else None)))
        yield sinks


@contextmanager
def wandb_sink(cfg, resuming):
    """wandb: the provenance record is the run's config, every other record a row of its history at the record's
    step. The run's id is kept in out_dir/wandb_id, so a resumed run continues the same wandb run (wandb drops
    the rows of steps it already has: those after the checkpoint, trained again)."""
    import wandb
    path = os.path.join(cfg["out_dir"], "wandb_id")
    name = cfg["wandb_run_name"] or os.path.basename(os.path.abspath(cfg["out_dir"]))
    run = wandb.init(project=cfg["wandb_project"], name=name, resume="allow", dir=cfg["out_dir"],
                     id=open(path).read().strip() if resuming and os.path.exists(path) else None)
    atomic_write(path, run.id)

    def write(rec):
        if "step" in rec:
            run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
        else:  # the provenance: the config's keys, and torch, device_name, world, git beside them
            run.config.update({**rec["config"], **{k: v for k, v in rec.items() if k != "config"}},
                              allow_val_change=True)
    try:
        yield write
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


@contextmanager
def tensorboard_sink(folder, purge_step=None):
    """TensorBoard: a record's numbers as scalars and its text as text at its step, the provenance as text. A
    resumed run first hides the events from purge_step on (the steps after its checkpoint, trained again)."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(folder, purge_step=purge_step)

    def write(rec):
        if "step" not in rec:
            writer.add_text("provenance", "    " + json.dumps(rec, indent=2).replace("\n", "\n    "))  # (a code block)
        for k, v in rec.items():
            if k != "step" and "step" in rec:
                (writer.add_text if isinstance(v, str) else writer.add_scalar)(k, v, rec["step"])
        writer.flush()  # a killed run keeps what it logged
    try:
        yield write
    finally:
        writer.close()
