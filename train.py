"""
Train a Transformer. With no arguments this is the quickstart: the tiny model on the built-in
pystdlib corpus (prepared on first use), on the best device present.

    python train.py                                   # quickstart
    python train.py config/gpt2_124m.py --batch_size=8  # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama_7b.py   # DDP / FSDP

Every name in the defaults block below can be set by a config file (plain Python assignments)
or by --key=value (parsed with ast.literal_eval); `--help` lists them. Each is annotated with its
type and constraint: an unknown key (the closest valid one is named), a wrong type, a value out of
range or keys that contradict each other stop the run with one line, before any work. A key left
unset (None, 'auto', 0 where it says so) adapts to the run, and the start-up lines say to what.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Annotated

import torch

import data
import model as M
import optim
import prepare
import sample
from checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, restore, save_checkpoint
from common import (UserError, all_reduce_sum, at_least, barrier, below, catch_signals, check_value,
                    destroy_distributed, device_rule, dir_lock, fraction, mix_seed, need, nonempty, one_of,
                    parse_config, provenance, rule, to_host, to_host_later, usage)
from logger import check_logging, log, log_eval, log_start, log_step, open_sinks
from parallelize import blocks_of, build_model, load_shards, setup

# -----------------------------------------------------------------------------------------------
# defaults: each key's annotation is its type and constraint (common.rule), checked by get_config
# I/O
out_dir: Annotated[str, nonempty] = "out"
init_from: Annotated[str, nonempty] = "scratch"  # scratch | resume (out_dir's newest checkpoint) | a checkpoint path
#                                                    (fine-tune) | hf:DIR or hf:NAME (a Hugging Face model, fine-tune)
eval_interval: Annotated[int, at_least(1)] = 250      # evaluate (and checkpoint) every this many steps
eval_iters: Annotated[int, at_least(1)] = 32          # validation rows: eval_iters x batch_size, the same at any world
log_interval: Annotated[int, at_least(1)] = 50        # a log line (means over the steps since the last) every this many
patience: Annotated[int, at_least(0)] = 0             # early stopping: after this many evaluations without gain
save_checkpoints: bool = True
checkpoint_interval: Annotated[int, at_least(0)] = 0  # save every this many steps; 0: at every evaluation
checkpoint_every_minutes: Annotated[float, at_least(0.0)] = 0.0  # also save when this long since the last (0: off)
keep_last: Annotated[int, at_least(1)] = 2            # checkpoints kept (ckpt-STEP.pt / .dcp), plus best.pt
max_bad_steps: Annotated[int, at_least(1)] = 10       # stop after this many non-finite (NaN/inf) steps in a row
sample_every: Annotated[int, at_least(0)] = 0         # log the model's output on a validation example every N steps
wandb_log: bool = False                               # also send log.jsonl's records to wandb (pip install wandb)
wandb_project: Annotated[str, nonempty] = "anvil"
wandb_run_name: Annotated[str, nonempty] = None       # None: out_dir's folder name
tensorboard_dir: Annotated[str, nonempty] = None      # also write the records as TensorBoard events here
# data
data_root: Annotated[str, nonempty] = "data"
dataset: Annotated[str, nonempty] = None              # data_root/dataset; None: resumed run's, else objective's corpus
tokenizer: Annotated[str, nonempty] = "bytes"         # used only when a built-in dataset has to be prepared
objective: Annotated[str, one_of(data.OBJECTIVES)] = None  # None: the checkpoint's, else clm. clm: next token |
#   mlm_nsp: BERT's masked LM + next sentence | classify: labelled text | span: T5's span corruption | seq2seq: pairs
seq_len: Annotated[int, at_least(0)] = 0              # tokens per sequence; 0: block_size (or what the data allows)
dec_len: Annotated[int, at_least(0)] = 0              # encoder-decoder's target tokens; 0: span's own, seq_len's
batch_size: Annotated[int, at_least(1)] = 8           # sequences per micro-step per rank
gradient_accumulation_steps: Annotated[int, at_least(1)] = 1  # global batch = batch_size * this * world size
label_fraction: Annotated[float, rule("in (0, 1]", lambda v: 0 < v <= 1, [0.0, 1.5])] = 1.0  # of the examples
span_targets: Annotated[str, one_of("spans", "whole")] = "spans"  # span: the decoder writes T5's targets (each
#   sentinel and the span it hid) or the whole window back (it copies what the encoder reads and fills the holes)
eval_rouge: Annotated[int, at_least(0)] = 0           # seq2seq: ROUGE and exact match of the greedy outputs for the
#   first this many validation pairs at each evaluation (pip install rouge-score)
# model: a preset from model.PRESETS; the fields after it override the preset (None: keep the preset's)
model: Annotated[str, one_of(*M.PRESETS)] = None      # None: the objective's (tiny, bert-tiny, t5-tiny)
vocab_size: Annotated[int, at_least(1)] = None        # None: the dataset's vocabulary (meta.json), + the objective's
pad_vocab_to: Annotated[int, at_least(0)] = 0         # round the vocabulary up to a multiple of this (64: faster)
block_size: Annotated[int, at_least(1)] = None
n_layer: Annotated[int, at_least(1)] = None
n_dec_layer: Annotated[int, at_least(0)] = None       # >0: an encoder-decoder (T5 presets)
n_head: Annotated[int, at_least(1)] = None
n_kv_head: Annotated[int, at_least(0)] = None         # 0: n_head
n_embd: Annotated[int, at_least(1)] = None
ffn_hidden: Annotated[int, at_least(0)] = None        # 0: the MLP's own rule
norm: Annotated[str, one_of(*M.NORMS)] = None
mlp: Annotated[str, one_of(*M.ACTIVATIONS)] = None
pos: Annotated[str, one_of(*M.POSITIONS)] = None
rope_theta: Annotated[float, at_least(1.0)] = None
tie_embeddings: bool = None
bias: bool = None
qk_norm: bool = None                                  # RMSNorm of each head's queries and keys (presets: off)
dropout: Annotated[float, below(0.0, 1.0)] = None
# optimizer and schedule (optim.py)
optimizer: Annotated[str, one_of("auto", "adamw", "muon")] = "auto"  # muon: Muon (torch 2.9+) for the blocks'
#   matrices, AdamW for the rest; auto: muon, but adamw from trained weights, under FSDP or before torch 2.9
learning_rate: Annotated[float, at_least(0.0)] = 3e-3  # AdamW's peak (with muon: embeddings, head, norms, biases)
head_lr_mult: Annotated[float, at_least(0.0)] = 1.0   # classify: the pooler and classifier at this x learning_rate
muon_lr: Annotated[float, at_least(0.0)] = 0.01       # Muon's peak; its schedule is AdamW's x muon_lr / learning_rate
muon_momentum: Annotated[float, below(0.0, 1.0)] = 0.95
lr_schedule: Annotated[str, one_of(*optim.SCHEDULES)] = "wsd"  # after warmup; wsd: constant, then linear to min_lr
decay_frac: Annotated[float, fraction] = 0.2          # wsd: the share of the steps that decays
max_iters: Annotated[int, at_least(0)] = 2200         # 0: evaluate the init_from checkpoint only
weight_decay: Annotated[float, at_least(0.0)] = 0.1
beta1: Annotated[float, below(0.0, 1.0)] = 0.9
beta2: Annotated[float, below(0.0, 1.0)] = 0.95
grad_clip: Annotated[float, at_least(0.0)] = 1.0      # 0: off
warmup_iters: Annotated[int, at_least(0)] = None      # None: 100, or a tenth of the decay when that is shorter
lr_decay_iters: Annotated[int, at_least(1)] = None    # None: max_iters
min_lr: Annotated[float, at_least(0.0)] = 0.0         # where the decay ends (Muon's: scaled as its peak)
# system
device: Annotated[str, device_rule] = "auto"          # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
dtype: Annotated[str, one_of("auto", "float32", "bfloat16", "float16")] = "auto"  # auto: bf16 on a GPU that has
#                                                       it, else fp16 (fp32 under FSDP); float32 elsewhere
compile: bool = None                                  # torch.compile; None: on for cuda, off elsewhere
threads: Annotated[int, at_least(0)] = 0              # CPU threads per process; 0: all cores, split between ranks
seed: Annotated[int, at_least(0)] = 1337
parallel: Annotated[str, one_of("auto", "single", "ddp", "fsdp")] = "auto"  # auto: ddp under torchrun, else single
activation_checkpointing: Annotated[str, one_of("none", "full")] = "none"  # full: recompute each block in backward
fsdp_grad_sync: Annotated[str, one_of("micro", "step")] = "micro"  # with accumulation: micro reduce-scatters every
#                        micro-step (gradients stay sharded); step once per step, holding unsharded fp32 gradients
dist_timeout_minutes: Annotated[int, at_least(1)] = 10  # a collective waiting longer (a dead rank) fails
# -----------------------------------------------------------------------------------------------
DEFAULTS = {k: globals()[k] for k in __annotations__}
RULES = dict(__annotations__)  # a test checks that every key has one
MODEL_KEYS = [f.name for f in fields(M.ModelConfig)]


def get_config(argv):
    """Defaults, then config files (in order), then --key=value overrides; then every rule. A plain dict."""
    return check_config(parse_config(argv, DEFAULTS, RULES, "the defaults block at the top of train.py"))


def check_config(cfg):
    """Each key against its rule, then the rules across the keys the user set, and a scratch run's model: a
    UserError names the first problem. Returns cfg, unchanged."""
    for key, r in RULES.items():
        check_value(key, cfg[key], DEFAULTS[key], r)
    if cfg["max_iters"] == 0 and cfg["init_from"] in ("scratch", "resume"):
        raise UserError("max_iters=0 trains nothing: it only evaluates a checkpoint given as init_from=PATH; "
                        "set max_iters >= 1")
    decay, which = optim.decay_end(cfg), "lr_decay_iters" if cfg["lr_decay_iters"] else "max_iters"
    if cfg["warmup_iters"] is not None and cfg["warmup_iters"] >= decay and cfg["max_iters"]:
        raise UserError(f"warmup_iters={cfg['warmup_iters']} is not shorter than the decay ({which}={decay}): the "
                        f"rate would never decay; lower warmup_iters (unset: 100, or a tenth of the decay)")
    if cfg["min_lr"] > cfg["learning_rate"]:
        raise UserError(f"min_lr={cfg['min_lr']} is above learning_rate={cfg['learning_rate']}: lower min_lr")
    if cfg["optimizer"] == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"optimizer='muon' needs torch 2.9 or newer (torch.optim.Muon), this is {torch.__version__}: "
                        f"upgrade torch or use optimizer='adamw'")
    if cfg["optimizer"] == "muon" and cfg["parallel"] == "fsdp":  # torch.optim.Muon would orthogonalise shards
        raise UserError("optimizer='muon' with parallel='fsdp' is not supported (Muon needs whole matrices, FSDP "
                        "holds shards): use parallel='ddp' or optimizer='adamw'")
    check_logging(cfg)
    if cfg["init_from"] == "scratch":  # else the checkpoint decides (resolve_run checks it)
        model_config(settle(cfg)[0])
    return cfg


def settle(cfg, ckpt=None):
    """(the config with each unset key replaced by what it becomes, notes for the start-up line): the
    objective, dataset and optimizer from the checkpoint (init_from) or the objective's record, the warmup and
    decay from the steps. Checks the rules the settled keys must obey."""
    c, notes, prev = dict(cfg), [], (ckpt or {}).get("config") or {}
    resuming = cfg["init_from"] == "resume"
    args = (ckpt or {}).get("model_args") or {}
    head = {"lm": "seq2seq" if args.get("n_dec_layer") else "clm"}.get(args.get("head"), args.get("head"))
    c["objective"] = c["objective"] or prev.get("objective") or head or "clm"
    obj = data.OBJECTIVES[c["objective"]]
    if c["dataset"] is None:
        c["dataset"] = prev.get("dataset") if resuming and prev.get("dataset") else obj.corpus
    c["model"] = c["model"] or (prev.get("model") or cfg["init_from"] if ckpt else obj.model)
    trained = ckpt is not None and not resuming
    keep = cfg["optimizer"] == "auto" and resuming and prev.get("optimizer", "auto") != "auto"  # the checkpoint's
    c["optimizer"] = prev["optimizer"] if keep else optim.optimizer_of(c, trained)
    if cfg["optimizer"] == "auto" and trained:
        notes.append(f"optimizer adamw: from trained weights a run trains at learning_rate={c['learning_rate']:g}")
    c["lr_decay_iters"], c["warmup_iters"] = optim.decay_end(c), optim.warmup_of(c)
    if cfg["warmup_iters"] is None and c["warmup_iters"] != 100:
        notes.append(f"warmup_iters {c['warmup_iters']}: a tenth of the decay ({c['lr_decay_iters']} steps)")
    if c["label_fraction"] < 1 and not obj.examples:
        raise UserError(f"label_fraction={c['label_fraction']} picks labelled examples, which objective="
                        f"{c['objective']!r} has not: drop it, or use objective='classify' or 'seq2seq'")
    if c["span_targets"] != "spans" and c["objective"] != "span":
        raise UserError(f"span_targets={c['span_targets']!r} is for objective='span', not {c['objective']!r}: "
                        f"drop it")
    if c["eval_rouge"] and c["objective"] != "seq2seq":
        raise UserError(f"eval_rouge={c['eval_rouge']} scores generated targets, which objective="
                        f"{c['objective']!r} has not: drop it, or use objective='seq2seq'")
    if c["eval_rouge"]:
        need("rouge_score.rouge_scorer", "rouge-score", "eval_rouge")
    if c["dec_len"] and not obj.decoder:
        raise UserError(f"dec_len={c['dec_len']} is the decoder's length, which objective={c['objective']!r} has "
                        f"not: drop it")
    return c, notes


# -----------------------------------------------------------------------------------------------
# resolve the run: everything read and checked before any compute

@dataclass(frozen=True)
class Run:
    """What a run reads before any compute, checked against each other."""
    cfg: dict                   # the settled config: every unset key replaced by what it became
    obj: data.Objective
    meta: dict                  # the corpus's meta.json
    splits: tuple               # (train, val), opened and fitted by the objective
    ckpt: dict | None           # the checkpoint to resume or fine-tune from
    ckpt_path: str | None
    mcfg: M.ModelConfig
    notes: list                 # what the unset keys became, for the start-up lines
    provenance: dict            # torch version, device, world size, git commit, the settled config

    @property
    def resuming(self):
        return self.cfg["init_from"] == "resume"

    @property
    def done(self):  # resuming a run that has reached max_iters
        return self.resuming and self.ckpt["step"] == self.cfg["max_iters"]


def resolve_run(cfg, rt):
    """Read the checkpoint and the corpus (prepared first if built in), settle the config, build the model config,
    fit the splits; every check before any compute."""
    ckpt, path, source = None, None, cfg["init_from"]
    if source == "resume":
        path = find_checkpoint(cfg["out_dir"])
        if path is None:
            raise UserError(f"init_from='resume' but {cfg['out_dir']} holds no checkpoint (ckpt-STEP.pt or .dcp); "
                            f"use init_from='scratch' or point out_dir at the run to resume")
        ckpt = load_checkpoint(path)
    elif source.startswith("hf:"):
        import hf  # optional dependencies (safetensors...) only on this path
        ckpt = {"model_args": asdict(hf.read_config(source[3:])[2])}
    elif source != "scratch":
        ckpt = load_checkpoint(path := find_checkpoint(source) or source)
    used = [n for n in ("best.pt", "best.dcp", os.path.basename(find_checkpoint(cfg["out_dir"]) or ""))
            if n and os.path.exists(os.path.join(cfg["out_dir"], n))]
    if source != "resume" and used:
        raise UserError(f"out_dir={cfg['out_dir']} holds the checkpoints of an earlier run ({', '.join(used)}): "
                        f"continue it with --init_from=resume, or train into another --out_dir (or delete them)")
    c, notes = settle(cfg, ckpt)
    obj, data_dir = data.OBJECTIVES[c["objective"]], os.path.join(c["data_root"], c["dataset"])
    if rt.master:
        if not os.path.exists(os.path.join(data_dir, "meta.json")) and c["dataset"] in prepare.BUILTIN:
            print(f"preparing the built-in corpus into {data_dir} (once)")
            prepare.prepare(name=c["dataset"], tokenizer=c["tokenizer"], out_dir=c["data_root"])
        data.max_ids(data_dir)  # computed once for a corpus older than these meta.json keys
    barrier()
    meta = data.max_ids(data_dir)  # no rank reads a whole split here
    if source.startswith("hf:"):  # FSDP: each rank reads its own dim-0 chunks, when no head changes
        ckpt = hf.load_checkpoint(source[3:], meta, (rt.rank, rt.world) if rt.parallel == "fsdp" and
                                  ckpt["model_args"]["head"] == obj.head else None)
    if ckpt and (ckpt["meta"]["tokenizer"], ckpt["meta"]["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"]):
        raise UserError(f"the checkpoint was trained with tokenizer {ckpt['meta']['tokenizer']!r}, dataset "
                        f"{c['dataset']!r} uses {meta['tokenizer']!r}; prepare it with "
                        f"--tokenizer={ckpt['meta']['tokenizer']}")
    if ckpt and source == "resume":
        if ckpt["step"] > c["max_iters"]:
            raise UserError(f"the checkpoint {path} is at step {ckpt['step']}, past max_iters={c['max_iters']}: "
                            f"raise max_iters to continue")
        trained = optim.optimizer_of({"optimizer": "adamw", "parallel": "single", **ckpt["config"]})
        if trained != c["optimizer"]:  # its optimizer state would not fit
            raise UserError(f"the checkpoint was trained with optimizer={trained!r}, the config gives "
                            f"optimizer={c['optimizer']!r}: resume with --optimizer={trained}")
        notes.append(f"resumed from {path} at step {ckpt['step']} (best validation loss {ckpt['best_val']:.4f})")
    opened = [obj.open(data_dir, s, meta) for s in ("train", "val")]  # (the corpus's errors come first)
    mcfg = model_config(c, meta, ckpt["model_args"] if ckpt else None)
    tokens = [meta[f"{s}_tokens"] for s in ("train", "val")]
    T = c["seq_len"] or mcfg.block_size  # (the model refuses one longer than its block_size)
    if not c["seq_len"] and cfg["block_size"] is None and min(tokens) - 2 < T:  # a preset's block_size: adapt
        T = min(tokens) - 2
        notes.append(f"seq_len {T}: the validation split holds {tokens[1]} tokens, fewer than block_size + 2")
    for split, name, n in zip(("train", "val"), ("training", "validation"), tokens):
        if n <= T + 1:
            raise UserError(f"the {name} split has {n} tokens, not more than a sequence ({T}: seq_len, or block_size "
                            f"when unset); use a smaller --seq_len or --block_size, or more data")
        if meta[f"{split}_max_id"] >= mcfg.vocab_size:  # recorded by prepare.py: no pass over the data
            raise UserError(f"the {name} split holds token id {meta[f'{split}_max_id']} >= the model's vocab_size="
                            f"{mcfg.vocab_size}: the corpus does not fit this vocabulary; re-run prepare.py")
    splits = tuple(obj.fit(split, T, c) for split in opened)
    if splits[0].get("D", 0) > mcfg.block_size:  # the decoder's rows (span: derived from seq_len)
        raise UserError(f"the decoder's rows are {splits[0]['D']} tokens, more than block_size={mcfg.block_size}: "
                        f"lower seq_len or dec_len, or raise block_size")
    c.update(seq_len=T, dec_len=splits[0].get("D", 0), device=str(rt.device), dtype=str(rt.dtype).split(".")[-1],
             parallel=rt.parallel, compile=rt.compile, **{k: getattr(mcfg, k) for k in MODEL_KEYS if k in DEFAULTS})
    return Run(c, obj, meta, splits, ckpt, path, mcfg, notes, provenance(c, rt.device, rt.world))


def model_config(cfg, meta=None, ckpt_args=None):
    """The ModelConfig of a run (cfg settled): the preset with the config's overrides, or the checkpoint's
    architecture (only dropout and the head may change). meta: the corpus's meta.json; None keeps the preset's
    vocabulary."""
    obj = data.OBJECTIVES[cfg["objective"]]
    # the encoder objectives: bidirectional, their head (classify: the corpus's labels), their extra tokens
    task = {} if obj.head == "lm" else dict(head=obj.head, causal=False, **(
        {"n_labels": len(meta["labels"]) if meta else 2} if obj.head == "classify" else {}))
    vocab = meta and meta["vocab_size"] + obj.extra_tokens
    if ckpt_args is not None:
        for k in MODEL_KEYS:
            if cfg.get(k) is not None and k != "dropout" and cfg[k] != ckpt_args[k]:
                raise UserError(f"the checkpoint was trained with {k}={ckpt_args[k]!r} but the config sets {k}="
                                f"{cfg[k]!r}: a different architecture; drop the override to use the checkpoint's")
    try:  # ModelConfig checks itself (divisible heads, known preset...): its ValueError is the user's error here
        if ckpt_args is not None:
            drop = cfg["dropout"] if cfg["dropout"] is not None else ckpt_args["dropout"]
            mcfg = M.ModelConfig(**dict(ckpt_args, **task, dropout=drop))
        else:
            overrides = {**({"type_vocab_size": 2} if task else {}), **task,
                         **{k: cfg[k] for k in MODEL_KEYS if cfg.get(k) is not None}}
            if vocab:
                overrides.setdefault("vocab_size", data.model_vocab(vocab, cfg["pad_vocab_to"]))
            mcfg = M.config_from_preset(cfg["model"], **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    if obj.decoder != bool(mcfg.n_dec_layer):
        raise UserError(f"objective={cfg['objective']!r} trains " + (
            "an encoder-decoder (n_dec_layer > 0): use model='t5-tiny', 't5-small' or 't5-base'" if obj.decoder else
            f"a model without a decoder, and this one has n_dec_layer={mcfg.n_dec_layer}: use objective='span' or "
            f"'seq2seq'"))
    if mcfg.head != obj.head:
        raise UserError(f"the model has head={mcfg.head!r}, objective={cfg['objective']!r} needs {obj.head!r}: "
                        f"set objective to match the checkpoint or the preset")
    if vocab and mcfg.vocab_size < vocab:
        raise UserError(f"vocab_size={mcfg.vocab_size} is smaller than the dataset's vocabulary ({vocab}: tokenizer "
                        f"{meta['tokenizer']}{f' + {obj.extra_tokens} special tokens' if obj.extra_tokens else ''})"
                        f": token ids would overflow the embedding")
    for key in ("seq_len", "dec_len"):
        if cfg[key] > mcfg.block_size:
            raise UserError(f"{key}={cfg[key]} is longer than the model's block_size={mcfg.block_size}: lower {key}"
                            f"{' or raise block_size' if ckpt_args is None else ' (the checkpoint fixes block_size)'}")
    return mcfg


# -----------------------------------------------------------------------------------------------
# build: the model (parallelize.py), the optimizers (optim.py), and what a checkpoint restores

COUNTERS = ("step", "best_val", "bad_evals", "last_eval")  # what a checkpoint carries besides the state dicts


@dataclass
class State:
    """The live objects of a run, and the counters the loop updates."""
    model: torch.nn.Module      # what is called: plain, compiled, DDP-wrapped or FSDP-sharded
    raw: torch.nn.Module        # the model itself, for state dicts
    optimizers: list            # AdamW, and Muon with optimizer='muon' (optim.make_optimizer)
    scaler: torch.amp.GradScaler
    step: int = 0
    best_val: float = float("inf")
    bad_evals: int = 0          # evaluations since the best one (early stopping)
    last_eval: int = -1         # the step last evaluated: a resumed run does not repeat it
    bad_run: int = 0            # non-finite steps in a row
    saved_step: int = -1        # the last checkpoint: its step, when it was written, its path
    saved_time: float = 0.0
    saved_path: str | None = None


def build(cfg, rt, mcfg, ckpt=None, resuming=False):
    """Model, optimizers and loss scaler (cfg settled); from a checkpoint, the weights (fine-tune) or everything
    (resume)."""
    model = build_model(cfg, mcfg, rt)
    raw = model.module if rt.parallel == "ddp" else model
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    s = State(model, raw, optim.make_optimizer(cfg, raw, blocks_of(raw)), scaler)
    if ckpt and not resuming and ckpt["model_args"].get("head", "lm") != mcfg.head:  # fine-tune onto another head
        if "model" not in ckpt:
            raise UserError("fine-tuning onto another head needs a .pt checkpoint: export the sharded one with "
                            "python sample.py --ckpt=PATH.dcp --export=FILE.pt")
        ckpt["model"] = data.adapt_heads(ckpt["model"], raw, cfg["seed"])
    if ckpt and "shard" in ckpt:  # an hf: import under FSDP: this rank read its own dim-0 chunks only
        load_shards(raw, ckpt["model"])
    elif ckpt:
        restore(ckpt, raw, s.optimizers if resuming else ())
    if resuming:
        s.scaler.load_state_dict(ckpt["scaler"])
        for k in COUNTERS:
            setattr(s, k, ckpt[k])
    s.saved_step, s.saved_time, s.saved_path = s.step if resuming else -1, time.time(), find_checkpoint(cfg["out_dir"])
    return s


# -----------------------------------------------------------------------------------------------
# the steps of the loop

def get_batch(run, rt, step, micro):
    """Micro-batch `micro` of training step `step` on this rank, on the device."""
    B, A = run.cfg["batch_size"], run.cfg["gradient_accumulation_steps"]
    first = (micro * rt.world + rt.rank) * B  # this rank's rows of the global batch
    rows = run.obj.batch(run.splits[0], range(first, first + B), A * rt.world * B, run.cfg["seed"], step)
    return data.to_device(rows, rt.device)


@torch.no_grad()
def evaluate(model, run, rt, stop=()):
    """{"loss" (mlm_nsp: L_MLM + L_NSP), the objective's metrics} over eval_iters x batch_size validation rows, the
    same at any world size, shared out among the ranks; one collective, one read. A signal (`stop`) ends it at once
    in one process (None); ranks finish it (they would have to agree) and the next step's flags carry it."""
    model.eval()
    B, n, obj = run.cfg["batch_size"], run.cfg["eval_iters"] * run.cfg["batch_size"], run.obj
    lo, hi = rt.rank * n // rt.world, (rt.rank + 1) * n // rt.world
    calls = -(-(-(-n // rt.world)) // B)  # forward calls, the same on every rank (DDP and FSDP forwards communicate)
    total = torch.zeros(2 * len(obj.metrics), device=rt.device, dtype=torch.float64)
    for j in range(calls):
        if stop and rt.world == 1:
            model.train()
            return None
        a, b = lo + (hi - lo) * j // calls, lo + (hi - lo) * (j + 1) // calls
        batch = data.to_device(obj.batch(run.splits[1], range(a, b) if b > a else range(1), n), rt.device)
        with rt.autocast():
            logits, loss = model(**batch)
        total += data.metric_sums(obj, logits, loss, batch) * (b > a)  # (a rank without rows: a call, weight 0)
    model.train()
    return data.metrics_from_sums(obj, to_host(all_reduce_sum(total)))


def forward_backward(s, batches, run, rt):
    """Forward and backward over one step's micro-batches, reducing gradients on the last one only, then
    unscale and clip. Returns the step's numbers as device scalars: {"loss", "grad_norm", and the objective's
    metrics}, each the mean over the micro-batches."""
    A, obj = run.cfg["gradient_accumulation_steps"], run.obj
    loss_sum, parts = 0.0, 0.0
    for micro, batch in enumerate(batches):
        last = micro == A - 1
        if rt.parallel == "fsdp":
            s.model.set_requires_gradient_sync(last or run.cfg["fsdp_grad_sync"] == "micro")
        with s.model.no_sync() if rt.parallel == "ddp" and not last else nullcontext(), rt.autocast():
            logits, loss = s.model(**batch)
            if obj.head != "lm":  # the loss's parts and accuracies, for the log line
                sums = data.metric_sums(obj, logits, loss, batch)
                parts = parts + sums[0::2] / sums[1::2].clamp(min=1) / A
            loss = loss / A
        s.scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    for opt in s.optimizers:
        s.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), run.cfg["grad_clip"] or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor (no comm.)
    stats = {"loss": loss_sum, "grad_norm": norm}
    if obj.head != "lm":
        stats.update(zip(obj.metrics, parts))
    return stats


def train_step(s, batches, run, rt, lr, flags=()):
    """One optimizer step at lr: forward/backward; the step's one collective (its numbers, whether a rank saw a
    non-finite loss or gradient norm, the host `flags`, e.g. "a signal came"); the update, skipped on the device if
    non-finite; the step's one read, once the update is queued (the GPU updates while the host waits). max_bad_steps
    bad steps in a row stop the run. Returns ({name: mean over ranks}, the flags summed over ranks, bad or not)."""
    cfg = run.cfg
    optim.set_lr(s.optimizers, cfg, lr)
    if s.raw.cfg.dropout:  # dropout, a step's only randomness, as a function of the step, so resume is exact (the
        torch.manual_seed(mix_seed(cfg["seed"], s.step * 1009 + rt.rank))  # reseed costs 1.4 ms: not without it)
    stats = forward_backward(s, batches, run, rt)
    host = torch.tensor([float(f) for f in flags], dtype=torch.float32)
    host = host.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else host.to(rt.device)
    nonfinite = (~torch.isfinite(stats["loss"].float()) | ~torch.isfinite(stats["grad_norm"])).float()
    numbers = torch.stack([v.float() for v in stats.values()])
    packed = all_reduce_sum(torch.cat([numbers, nonfinite.view(1), host]))
    read = to_host_later(packed)  # started now, waited for after the update is queued
    optim.step(s.optimizers, (packed[len(stats)] > 0).float())  # fp16: a skipped step lowers the scale below
    s.scaler.update()
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    s.step += 1
    values = read()
    stats = {k: v / rt.world for k, v in zip(stats, values)}
    bad_ranks, flags = values[len(stats)], values[len(stats) + 1:]
    # fp16: a non-finite gradient is the loss scale's overflow, which the scaler handles: only a bad loss counts
    bad = not math.isfinite(stats["loss"]) or (bool(bad_ranks) and not s.scaler.is_enabled())
    s.bad_run = s.bad_run + 1 if bad else 0
    if bad:
        log(rt, f"step {s.step}: non-finite loss {stats['loss']} or gradient norm on {bad_ranks:.0f} rank(s): update "
                f"skipped ({s.bad_run} in a row)")
    if s.bad_run >= cfg["max_bad_steps"]:
        raise UserError(f"stopping at step {s.step}: {s.bad_run} non-finite steps in a row at lr {lr:.2e}; "
                        f"the last good checkpoint is {s.saved_path}; resume from it with a lower "
                        f"learning_rate (or more warmup_iters, or grad_clip)")
    return stats, flags, bad


def eval_step(s, run, rt, summary, stop, meter):
    """Evaluate, note the best, checkpoint when due. Returns True when the run ends: early stopping, or a
    signal during the evaluation."""
    cfg = run.cfg
    metrics = evaluate(s.model, run, rt, stop)
    if metrics is None:
        return preempt(s, run, rt, summary)
    val_loss = metrics["loss"]
    improved = val_loss < s.best_val
    s.best_val, s.bad_evals = (val_loss, 0) if improved else (s.best_val, s.bad_evals + 1)
    s.last_eval = s.step
    if cfg["eval_rouge"]:  # seq2seq: ROUGE and exact match of greedy outputs (every rank runs the model: FSDP)
        with rt.autocast():
            metrics.update(sample.seq2seq_scores(s.raw, run.meta, run.splits[1], cfg["eval_rouge"]))
    summary["evals"].append((s.step, val_loss))
    summary["metrics"] = metrics
    log_eval(s, cfg, rt, meter, metrics, improved)
    if s.step > 0 and (improved or not cfg["checkpoint_interval"]):
        save(s, run, rt, best=improved)
    if cfg["patience"] and s.bad_evals >= cfg["patience"]:
        log(rt, f"early stop: no improvement in {s.bad_evals} evaluations (best {s.best_val:.4f})")
        summary["stopped_early"] = True
    return summary["stopped_early"]


def preempt(s, run, rt, summary):
    """A signal came: checkpoint this step and end the run (resume continues from here)."""
    save(s, run, rt)
    log(rt, f"signal received: checkpoint at step {s.step} written to {s.saved_path}; exiting (continue with "
            f"--init_from=resume)")
    summary["preempted"] = True
    return True


def save(s, run, rt, best=False):
    """Checkpoint ckpt-STEP (once per step) and, if `best`, best; keep the newest keep_last ckpt-STEP.
    Never saves non-finite weights; a failed write names the previous checkpoint, which stays intact."""
    cfg = run.cfg
    if not cfg["save_checkpoints"] or (s.saved_step == s.step and not best):
        return
    local = [(p.to_local() if hasattr(p, "to_local") else p) for p in s.raw.parameters()]
    bad = torch.stack([(~torch.isfinite(p)).any() for p in local]).sum().view(1).double()  # one read, not one each
    if to_host(all_reduce_sum(bad))[0]:
        raise RuntimeError(f"refusing to save a model with non-finite weights at step {s.step}")
    extra = {"scaler": s.scaler.state_dict(), **{k: getattr(s, k) for k in COUNTERS}, "config": cfg,
             "model_args": asdict(run.mcfg), "meta": run.meta, "provenance": run.provenance}
    out = cfg["out_dir"]
    for name in ([f"ckpt-{s.step:07d}"] if s.saved_step != s.step else []) + (["best"] if best else []):
        try:
            save_checkpoint(os.path.join(out, name), s.raw, s.optimizers, extra, rt.parallel, rt.master)
        except OSError as e:
            raise OSError(f"could not write checkpoint {name} to {out} ({e}); the previous checkpoint "
                          f"{s.saved_path} is intact: free space or fix permissions, then resume") from e
    if rt.master:
        prune_checkpoints(out, cfg["keep_last"])
    s.saved_step, s.saved_time, s.saved_path = s.step, time.time(), find_checkpoint(out)


# -----------------------------------------------------------------------------------------------

def train(cfg):
    """Run training with a config dict (checked, and left unchanged). Returns a summary: the training
    losses, the evaluations, the final step, best validation loss and model, and the settled config."""
    rt = setup(check_config(cfg))
    run = resolve_run(cfg, rt)
    if run.done:  # a requeued job whose run had finished: nothing to do, and nothing changes
        log(rt, f"{run.ckpt_path} is at step {run.ckpt['step']} = max_iters: the run is complete (best validation "
                f"loss {run.ckpt['best_val']:.4f}); raise max_iters to train on")
        return {"step": run.ckpt["step"], "best_val": run.ckpt["best_val"], "model": None, "train_losses": [],
                "evals": [], "stopped_early": False, "bad_steps": 0, "wall_s": 0.0, "config": run.cfg}
    c = run.cfg
    with dir_lock(c["out_dir"]) if rt.master else nullcontext(), open_sinks(c, rt, run) as sinks:  # one run at a
        s = build(c, rt, run.mcfg, run.ckpt, run.resuming)                                   # time writes out_dir
        meter = log_start(s, rt, run, sinks)
        summary = {"train_losses": [], "evals": [], "stopped_early": False, "bad_steps": 0, "config": c}
        stop = []  # the signals received
        with catch_signals(stop):
            while True:
                if (s.step % c["eval_interval"] == 0 or s.step == c["max_iters"]) and s.step != s.last_eval:
                    if eval_step(s, run, rt, summary, stop, meter):
                        break
                if s.step >= c["max_iters"]:
                    break
                t_step, lr = time.time(), optim.get_lr(c, s.step)
                batches = (get_batch(run, rt, s.step, micro) for micro in range(c["gradient_accumulation_steps"]))
                timed = time.time() - s.saved_time > 60 * c["checkpoint_every_minutes"] > 0
                stats, (signal_seen, due), bad = train_step(s, batches, run, rt, lr, (bool(stop), bool(timed)))
                summary["train_losses"].append(stats["loss"])
                summary["bad_steps"] += bad
                if signal_seen and preempt(s, run, rt, summary):
                    break
                if (c["checkpoint_interval"] and s.step % c["checkpoint_interval"] == 0) or due:
                    save(s, run, rt)
                log_step(s, c, rt, meter, stats, lr, time.time() - t_step)
    summary.update(step=s.step, best_val=s.best_val, model=s.raw, wall_s=time.time() - meter.t0)
    return summary


def main(argv):
    """The command line. A user error, or running out of GPU memory, is one line on stderr and exit status 2;
    anything else is a bug and keeps its traceback."""
    if {"-h", "--help"} & set(argv):
        return print(usage(__doc__, DEFAULTS, RULES, __file__)) or 0
    try:
        config = get_config(argv)
        train(config)
    except UserError as e:
        return print(f"train.py: error: {e}", file=sys.stderr) or 2
    except torch.cuda.OutOfMemoryError:
        return print(f"train.py: error: out of GPU memory at batch_size={config['batch_size']}, seq_len="
                     f"{config['seq_len'] or 'block_size'}, activation_checkpointing="
                     f"{config['activation_checkpointing']!r}: lower batch_size (raise gradient_accumulation_steps "
                     f"to keep the global batch), shorten seq_len, or set activation_checkpointing='full'",
                     file=sys.stderr) or 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
