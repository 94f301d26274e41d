"""
Watching a run: the console, out_dir/log.jsonl and the optional wandb and TensorBoard sinks, from rank 0 only;
every record goes to each of them. log.jsonl opens with the run's provenance (torch, device, world, git commit
and the resolved config: common.provenance), then one record per log line:

    training     {"step", "loss", "lr", "tok_s", "mfu", "ms_step", "eta_s", "elapsed_s", and the head's parts}
    evaluation   {"step", "val_loss", "val_<part>" (mlm_acc, ...), "val_bpb" (clm), "elapsed_s"}
    sample       {"step", "sample"}: the model's output on a fixed validation example (sample_every)

A resumed run appends its own provenance and records to the same file (plot.py reads them as one run).
Bits per byte (val_bpb) is the validation loss in nats per token times the validation split's tokens per UTF-8
byte (meta.json's val_tokens / val_bytes), over ln 2: comparable across tokenizers.
"""
import importlib.util
import itertools
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import torch

import data
import model as M
import prepare
from common import UserError, all_reduce_sum, atomic_write, mfu, peak_flops, state_bytes, to_host, unsharded_grads

SAMPLE_PROMPT, SAMPLE_TOKENS = 32, 64  # clm samples: the validation split's first 32 tokens, continued by 64
SAMPLED = ("clm", "mlm_nsp", "classify", "span", "seq2seq")  # the objectives sample_every knows how to show


def check_logging(cfg):
    """The logging keys, before any work: a sink's package must be installed."""
    for key, package in (("wandb_log", "wandb"), ("tensorboard_dir", "tensorboard")):
        if cfg[key] and importlib.util.find_spec(package) is None:
            raise UserError(f"{key}={cfg[key]!r} needs the {package} package: pip install {package}")
    if cfg["sample_every"] and cfg["objective"] not in SAMPLED:
        raise UserError(f"sample_every is for objective {', '.join(SAMPLED)}, not {cfg['objective']!r}: set sample_every=0")


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
    """What the log keeps between records: the step time's moving average and the metric sums since the last
    log line, the sinks, the validation split's tokens per byte, and sample_every's fixed example."""
    tokens_per_step: int
    flops_per_token: float
    peak: float
    t0: float = field(default_factory=time.time)
    dt_ema: float | None = None
    sums: object = 0
    sinks: list = field(default_factory=list)
    tokens_per_byte: float | None = None
    example: tuple | None = None  # (data.eval_batch row 0 of the validation split, the tokenizer, meta.json)


def log_start(s, cfg, rt, run, sinks=()):
    """The resolved config, the model, device and memory lines; the provenance record opens log.jsonl (and
    is the sinks' config). Returns the Meter the later records go through."""
    if rt.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    log(rt, json.dumps(run.provenance["config"]))  # the resolved config: 'auto' and None replaced by their values
    log(rt, f"model {cfg['model']}: {s.raw.num_params():,} parameters; {asdict(run.mcfg)}")
    log_record(rt, cfg, run.provenance, sinks)
    peak, peak_src = peak_flops(rt.device, rt.dtype)
    D = run.splits[0]["D"] if run.mcfg.n_dec_layer else 0  # an encoder-decoder's row: T source + D target tokens
    meter = Meter(cfg["batch_size"] * cfg["gradient_accumulation_steps"] * rt.world * (run.T + D),
                  M.flops_per_token(run.mcfg, run.T, dec_len=D or None), peak, sinks=list(sinks))
    # bits per byte for clm only: its loss is a code length of the whole text. MLM's loss is over the 15% masked
    # tokens, each seen with both sides' context, and classify's is per example: neither measures the text's bytes.
    if cfg["objective"] == "clm" and run.meta.get("val_bytes"):
        meter.tokens_per_byte = run.meta["val_tokens"] / run.meta["val_bytes"]
    if cfg["sample_every"]:
        meter.example = (data.eval_batch(run.splits[1], cfg["objective"], run.T, range(1), 1),
                         prepare.get_tokenizer_from_meta(run.meta), run.meta)
    tf32 = " (TF32 matmuls)" if rt.device.type == "cuda" and rt.dtype == torch.float32 else ""
    log(rt, f"device {rt.device} {str(rt.dtype).split('.')[-1]}{tf32}, parallel={rt.parallel} world={rt.world}, "
        f"{meter.tokens_per_step:,} tokens/step, MFU vs {peak / 1e12:.2f} TFLOP/s ({peak_src})")
    log(rt, "per-rank memory estimate: " + ", ".join(f"{k} {b / 2**30:.2f} GiB" for k, b in
                                                     state_bytes(s.raw.num_params(), rt.world, rt.parallel, unsharded_grads(cfg, rt.parallel)).items())
        + " + activations")
    return meter


def log_step(s, cfg, rt, meter, loss, lr, dt):
    """Every log_interval steps: the console line and a log.jsonl record (loss, lr, tok/s, MFU, ETA); every
    sample_every steps, a sample."""
    meter.dt_ema = dt if meter.dt_ema is None else 0.9 * meter.dt_ema + 0.1 * dt
    if cfg["sample_every"] and s.step % cfg["sample_every"] == 0:
        log_sample(s, cfg, rt, meter)
    if s.step % cfg["log_interval"] and s.step != cfg["max_iters"]:
        return
    head = s.raw.cfg.head
    parts = {k: v for k, v in data.metrics_from_sums(head, to_host(all_reduce_sum(meter.sums))).items() if k != "loss"} if head != "lm" else {}
    meter.sums = 0
    tok_s = meter.tokens_per_step / meter.dt_ema
    util, eta = mfu(meter.flops_per_token, tok_s, meter.peak, rt.world), meter.dt_ema * (cfg["max_iters"] - s.step)
    log_record(rt, cfg, {"step": s.step, "loss": round(loss, 4), "lr": lr, "tok_s": round(tok_s), "mfu": round(util, 4),
                         "ms_step": round(meter.dt_ema * 1000, 1), "eta_s": round(eta), "elapsed_s": round(time.time() - meter.t0, 1),
                         **{k: round(v, 4) for k, v in parts.items()}}, meter.sinks)
    mem = (f", peak memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB allocated "
           f"{torch.cuda.max_memory_reserved(rt.device) / 2**30:.1f} reserved" if rt.device.type == "cuda" else "")
    log(rt, f"step {s.step}: loss {loss:.4f}" + "".join(f", {k} {v:.3f}" for k, v in parts.items()) +
        f", lr {lr:.2e}, {tok_s:,.0f} tok/s, MFU {util:.1%}, {meter.dt_ema * 1000:.1f} ms/step, ETA {eta / 60:.1f} min{mem}")


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
    """The model on the fixed validation example, into the log: clm continues its first SAMPLE_PROMPT tokens
    greedily, mlm_nsp fills in its masked tokens, classify names its label. Every rank runs the model (under
    FSDP each holds only a shard of it); rank 0 writes."""
    batch, tok, meta = meter.example
    b, base = data.to_device(batch, rt.device), meta["vocab_size"]
    s.model.eval()
    with rt.autocast():
        if cfg["objective"] == "clm":
            n = min(SAMPLE_PROMPT, b["idx"].size(1))
            out = to_host(s.raw.generate(b["idx"][:, :n], SAMPLE_TOKENS, temperature=0.0, use_cache=False)[0])
            text = f"{tok.decode(out[:n])!r} -> {tok.decode(out[n:])!r}"
        elif cfg["objective"] == "mlm_nsp":  # the pair with each masked token replaced by the prediction, in «»
            (mlm, nsp), _ = s.raw(**b)  # mlm (1, K, V) at the K slots of M.mlm_positions
            mlm[..., base:] = mlm[..., meta["sep_id"]] = float("-inf")  # text tokens only
            pos, pred = to_host(M.mlm_positions(b["targets"])[0]), to_host(mlm[0].argmax(-1))
            truth, sep = batch["targets"][0], data.special_ids(base).sep
            fills = {p: y for p, y in zip(pos, pred) if truth[p] != -1}  # position: predicted id
            ids = [fills.get(j, i) for j, i in enumerate(batch["idx"][0].tolist())]
            groups = itertools.groupby(enumerate(ids), lambda ji: "sep" if ji[1] == sep else ji[0] in fills)
            shown = "".join(" [SEP] " if k == "sep" else ("«{}»" if k else "{}").format(tok.decode([i for _, i in g])) for k, g in groups)
            text = (f"{shown.strip()!r} ({sum(y == truth[p] for p, y in fills.items())}/{len(fills)} masked tokens right, next "
                    f"sentence {'right' if to_host(nsp.argmax(-1))[0] == batch['labels'][0] else 'wrong'})")
        elif cfg["objective"] in data.T5_OBJECTIVES:  # the decoder's greedy output for the source
            out = to_host(s.raw.generate(b["idx"], SAMPLE_TOKENS, temperature=0.0, attn_mask=b["attn_mask"],
                                         start_id=data.special_ids(base).pad, stop_id=meta["sep_id"])[0])
            text = f"{data.show(tok, batch['idx'][0][batch['attn_mask'][0]].tolist(), base)[-120:]!r} -> {data.show(tok, out, base)!r}"
        else:
            logits, _ = s.raw(**b)  # (1, n_labels)
            text = f"{tok.decode(batch['idx'][0].tolist())[:80]!r} -> {meta['labels'][to_host(logits.argmax())]} " \
                   f"(true: {meta['labels'][int(batch['labels'][0])]})"
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
            sinks.append(stack.enter_context(tensorboard_sink(cfg["tensorboard_dir"], run.ckpt["step"] + 1 if run.resuming else None)))
        yield sinks


@contextmanager
def wandb_sink(cfg, resuming):
    """wandb: the provenance record is the run's config, every other record a row of its history at the record's
    step. The run's id is kept in out_dir/wandb_id, so a resumed run continues the same wandb run (wandb drops
    the rows of steps it already has: those after the checkpoint, trained again)."""
    import wandb
    path = os.path.join(cfg["out_dir"], "wandb_id")
    run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or os.path.basename(os.path.abspath(cfg["out_dir"])),
                     id=open(path).read().strip() if resuming and os.path.exists(path) else None, resume="allow", dir=cfg["out_dir"])
    atomic_write(path, run.id)

    def write(rec):
        if "step" in rec:
            run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
        else:  # the provenance: the config's keys, and torch, device_name, world, git beside them
            run.config.update({**rec["config"], **{k: v for k, v in rec.items() if k != "config"}}, allow_val_change=True)
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
            writer.add_text("provenance", "    " + json.dumps(rec, indent=2).replace("\n", "\n    "))  # indented: a code block
        for k, v in rec.items():
            if k != "step" and "step" in rec:
                (writer.add_text if isinstance(v, str) else writer.add_scalar)(k, v, rec["step"])
        writer.flush()  # a killed run keeps what it logged
    try:
        yield write
    finally:
        writer.close()
