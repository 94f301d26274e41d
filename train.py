"""
Train a Transformer. With no arguments this is the quickstart: the tiny model on the built-in
pystdlib corpus (prepared on first use), on the best device present.

    python train.py                                   # quickstart
    python train.py config/gpt2_124m.py --batch_size=8  # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama_7b.py   # DDP / FSDP

Every name in the defaults block below can be set by a config file (plain Python assignments)
or by --key=value (parsed with ast.literal_eval); `--help` lists them. Each is annotated with its
type and constraint: an unknown key (the closest valid one is named), a wrong type, a value out of
range or keys that contradict each other stop the run with one line, before any work.
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
import prepare
from parallelize import blocks_of, build_model, load_shards
from checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, restore, save_checkpoint
from common import (UserError, all_reduce_sum, at_least, barrier, below, catch_signals, check_value, destroy_distributed,
                    device_rule, dir_lock, fraction, init_distributed, nonempty, one_of, parse_config, provenance, resolve_device,
                    resolve_dtype, rule, to_host, usage)
from logger import check_logging, log, log_eval, log_start, log_step, open_sinks

# -----------------------------------------------------------------------------------------------
# defaults: each key's annotation is its type and constraint (common.rule), checked by get_config
# I/O
out_dir: Annotated[str, nonempty] = "out"
init_from: Annotated[str, nonempty] = "scratch"       # 'scratch' | 'resume' (latest checkpoint in out_dir) | a checkpoint path | 'hf:DIR' or 'hf:NAME' (fine-tune)
eval_interval: Annotated[int, at_least(1)] = 250      # evaluate (and checkpoint) every this many steps
eval_iters: Annotated[int, at_least(1)] = 32          # validation batches per evaluation: a fixed set, comparable across runs
log_interval: Annotated[int, at_least(1)] = 50
patience: Annotated[int, at_least(0)] = 0             # early stopping: stop after this many evaluations without improvement (0: off)
save_checkpoints: bool = True
checkpoint_interval: Annotated[int, at_least(0)] = 0  # save every this many steps; 0: at every evaluation
checkpoint_every_minutes: Annotated[float, at_least(0.0)] = 0.0  # also save when this much time has passed since the last save (0: off)
keep_last: Annotated[int, at_least(1)] = 2            # checkpoints kept (ckpt-STEP.pt / .dcp), plus best.pt; older ones deleted after a save
max_bad_steps: Annotated[int, at_least(1)] = 10       # stop after this many non-finite (NaN/inf) steps in a row; each one is skipped
sample_every: Annotated[int, at_least(0)] = 0         # log the model's output on a fixed validation example every this many steps (0: off)
wandb_log: bool = False                               # also send log.jsonl's records to wandb (pip install wandb; WANDB_MODE=offline works)
wandb_project: Annotated[str, nonempty] = "anvil"
wandb_run_name: Annotated[str, nonempty] = None       # None: out_dir's folder name
tensorboard_dir: Annotated[str, nonempty] = None      # also write log.jsonl's records as TensorBoard events here (pip install tensorboard)
# data
data_root: Annotated[str, nonempty] = "data"
dataset: Annotated[str, nonempty] = "pystdlib"        # data_root/dataset/{train.bin,val.bin,meta.json}, see data.py
tokenizer: Annotated[str, nonempty] = "bytes"         # used only when the built-in dataset has to be prepared
objective: Annotated[str, one_of("clm", "mlm_nsp", "classify", "span", "seq2seq")] = "clm"  # next token | BERT's masked LM + next sentence | labelled text | T5's span corruption | source -> target pairs
seq_len: Annotated[int, at_least(0)] = 0              # tokens per sequence; 0: the model's block_size (BERT: 128, then 512, one position table)
dec_len: Annotated[int, at_least(0)] = 0              # encoder-decoder: decoder tokens per row; 0: T5's target length for span, seq_len for seq2seq
batch_size: Annotated[int, at_least(1)] = 8           # sequences per micro-step per rank (small batches, many steps: best for a CPU budget)
gradient_accumulation_steps: Annotated[int, at_least(1)] = 1  # micro-steps per optimizer step; global batch = batch_size * this * world
label_fraction: Annotated[float, rule("in (0, 1]", lambda v: 0 < v <= 1, [0.0, 1.5])] = 1.0  # classify: train on this share of the labelled examples (data.label_subset: nested, per seed)
# model: a preset from model.PRESETS; the fields after it override the preset (None: keep the preset's)
model: Annotated[str, one_of(*M.PRESETS)] = "tiny"
vocab_size: Annotated[int, at_least(1)] = None        # None: the dataset's vocabulary (meta.json)
pad_vocab_to: Annotated[int, at_least(0)] = 0         # round the dataset's vocabulary up to a multiple of this (64: faster matmuls; data.model_vocab)
block_size: Annotated[int, at_least(1)] = None
n_layer: Annotated[int, at_least(1)] = None
n_dec_layer: Annotated[int, at_least(0)] = None       # >0: an encoder-decoder (T5 presets), n_layer encoder blocks then these
n_head: Annotated[int, at_least(1)] = None
n_kv_head: Annotated[int, at_least(0)] = None         # 0: n_head
n_embd: Annotated[int, at_least(1)] = None
ffn_hidden: Annotated[int, at_least(0)] = None        # 0: the MLP's own rule
norm: Annotated[str, one_of("layernorm", "rmsnorm")] = None
mlp: Annotated[str, one_of("gelu", "swiglu", "relu", "geglu")] = None
pos: Annotated[str, one_of("learned", "rope", "relative")] = None
rope_theta: Annotated[float, at_least(1.0)] = None
tie_embeddings: bool = None
bias: bool = None
qk_norm: bool = None                                  # RMSNorm of each head's queries and keys before attention (None: the preset's, off)
dropout: Annotated[float, below(0.0, 1.0)] = None
# optimizer: AdamW, or Muon for the blocks' matrices; linear warmup, then cosine or WSD decay to min_lr
optimizer: Annotated[str, one_of("auto", "adamw", "muon")] = "auto"  # muon: Muon (torch 2.9+) for the 2-D weights inside the blocks, AdamW for the rest; auto: muon, else adamw under FSDP or before torch 2.9
learning_rate: Annotated[float, at_least(0.0)] = 3e-3  # AdamW's peak (with muon: embeddings, head, norms, biases)
head_lr_mult: Annotated[float, at_least(0.0)] = 1.0   # classify: the head's (pooler, classifier) learning rate, times learning_rate
muon_lr: Annotated[float, at_least(0.0)] = 0.01       # Muon's peak; its schedule is AdamW's scaled by muon_lr / learning_rate
muon_momentum: Annotated[float, below(0.0, 1.0)] = 0.95
lr_schedule: Annotated[str, one_of("cosine", "wsd")] = "wsd"  # wsd: warmup, constant, then linear to min_lr over the last decay_frac of the steps
decay_frac: Annotated[float, fraction] = 0.2          # wsd: the share of the steps (lr_decay_iters or max_iters) that decays
max_iters: Annotated[int, at_least(0)] = 2200         # 0: evaluate the init_from checkpoint only
weight_decay: Annotated[float, at_least(0.0)] = 0.1
beta1: Annotated[float, below(0.0, 1.0)] = 0.9
beta2: Annotated[float, below(0.0, 1.0)] = 0.95
grad_clip: Annotated[float, at_least(0.0)] = 1.0      # 0: off
warmup_iters: Annotated[int, at_least(0)] = 100
lr_decay_iters: Annotated[int, at_least(1)] = None    # None: max_iters
min_lr: Annotated[float, at_least(0.0)] = 0.0          # where the decay ends (Muon's: scaled as its peak)
# system
device: Annotated[str, device_rule] = "auto"          # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype: Annotated[str, one_of("auto", "float32", "bfloat16", "float16")] = "auto"  # auto: bfloat16 on cuda if supported, else float16; float32 elsewhere
compile: bool = None                                  # torch.compile; None: on for cuda, off elsewhere (on CPU it costs ~40 s and gains nothing)
threads: Annotated[int, at_least(0)] = 0              # CPU threads per process; 0: all cores, split between local ranks
seed: Annotated[int, at_least(0)] = 1337
parallel: Annotated[str, one_of("auto", "single", "ddp", "fsdp")] = "auto"  # auto: ddp under torchrun, else single
activation_checkpointing: Annotated[str, one_of("none", "full")] = "none"  # full: recompute each block in the backward pass
fsdp_grad_sync: Annotated[str, one_of("micro", "step")] = "micro"  # FSDP with accumulation: 'micro' reduce-scatters every micro-step (gradients stay sharded); 'step' once per step, holding unsharded fp32 gradients of all parameters between micro-steps
dist_timeout_minutes: Annotated[int, at_least(1)] = 10  # a collective that waits longer than this (a dead rank) fails instead of hanging
# -----------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str, type(None)))}
RULES = dict(__annotations__)  # a test checks that every key has one
MODEL_KEYS = [f.name for f in fields(M.ModelConfig)]


def get_config(argv):
    """Defaults, then config files (in order), then --key=value overrides; then every rule. A plain dict."""
    return check_config(parse_config(argv, DEFAULTS, RULES, "the defaults block at the top of train.py"))


def check_config(cfg):
    """Each key against its rule, then the rules across keys, and the model the config asks for: a UserError
    names the first problem. Returns cfg."""
    for key, r in RULES.items():
        check_value(key, cfg[key], DEFAULTS[key], r)
    if cfg["max_iters"] == 0 and cfg["init_from"] in ("scratch", "resume"):
        raise UserError("max_iters=0 trains nothing: it only evaluates a checkpoint given as init_from=PATH; set max_iters >= 1")
    decay = cfg["lr_decay_iters"] or cfg["max_iters"]
    if cfg["warmup_iters"] > decay and cfg["max_iters"]:
        raise UserError(f"warmup_iters={cfg['warmup_iters']} is longer than the decay ({'lr_decay_iters' if cfg['lr_decay_iters'] else 'max_iters'}"
                        f"={decay}): lower warmup_iters or raise the decay")
    if cfg["label_fraction"] < 1 and cfg["objective"] != "classify":
        raise UserError(f"label_fraction={cfg['label_fraction']} picks labelled examples, which objective={cfg['objective']!r} "
                        f"has not: drop it, or use objective='classify'")
    if cfg["min_lr"] > cfg["learning_rate"]:
        raise UserError(f"min_lr={cfg['min_lr']} is above learning_rate={cfg['learning_rate']}: lower min_lr")
    if cfg["optimizer"] == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"optimizer='muon' needs torch 2.9 or newer (torch.optim.Muon), this is {torch.__version__}: "
                        f"upgrade torch or use optimizer='adamw'")
    if cfg["optimizer"] == "muon" and cfg["parallel"] == "fsdp":  # torch.optim.Muon would orthogonalise each rank's shard
        raise UserError("optimizer='muon' with parallel='fsdp' is not supported (Muon needs whole matrices, FSDP holds "
                        "shards): use parallel='ddp' or optimizer='adamw'")
    check_logging(cfg)
    if cfg["init_from"] == "scratch":  # else the checkpoint decides the architecture (resolve_run checks it)
        model_config(cfg)
    return cfg


# -----------------------------------------------------------------------------------------------
# setup: where this process runs. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; see common.py

@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs, resolved once by setup() (the config dict stays as given)."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    parallel: str = "single"    # 'single' | 'ddp' | 'fsdp'
    compile: bool = False

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """bf16/fp16 autocast, except under FSDP, which casts through its MixedPrecisionPolicy instead."""
        low = self.dtype != torch.float32 and self.parallel != "fsdp"
        return torch.autocast(self.device.type, dtype=self.dtype) if low else nullcontext()


def setup(cfg):
    """Resolve device, dtype, parallel mode and compile from the config and torchrun's environment, set the
    CPU thread count (and TF32 on CUDA), and join the process group under torchrun. Returns a Runtime."""
    env = os.environ
    world, rank, local_rank = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(resolve_device(cfg["device"], cuda, cuda and torch.cuda.device_count(), torch.backends.mps.is_available(),
                                         int(env.get("LOCAL_WORLD_SIZE", 1)), local_rank))
    parallel = cfg["parallel"]
    if parallel == "auto":
        parallel = "ddp" if "RANK" in env else "single"
    if parallel != "single" and "RANK" not in env:
        raise UserError(f"parallel={parallel!r} needs torchrun: torchrun --nproc_per_node=N train.py ...")
    gpu = device.type == "cuda"
    dtype = getattr(torch, resolve_dtype(cfg["dtype"], device.type, parallel, gpu and torch.cuda.is_bf16_supported(),
                                         gpu and torch.cuda.get_device_name(device)))
    compile = gpu if cfg["compile"] is None else cfg["compile"]
    if compile and not (torch._dynamo.is_dynamo_supported() and device.type in ("cpu", "cuda")):
        raise UserError(f"compile=True is not supported here (Python {sys.version.split()[0]}, device "
                         f"{device.type}); use --compile=False")
    if gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 runs: TF32 matmuls (the MFU peak assumes them)
    else:
        torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 1) // int(env.get("LOCAL_WORLD_SIZE", 1))))
    init_distributed("nccl" if gpu else "gloo", cfg["dist_timeout_minutes"])
    return Runtime(device, dtype, rank, world, parallel, compile)


# -----------------------------------------------------------------------------------------------
# resolve the run: everything read and checked before any compute

@dataclass(frozen=True)
class Run:
    """What a run reads before any compute, checked against each other."""
    meta: dict                  # the corpus's meta.json
    splits: tuple               # (train, val) as the data.py batch builders take them
    ckpt: dict | None           # the checkpoint to resume or fine-tune from
    resuming: bool
    mcfg: M.ModelConfig
    T: int                      # tokens per sequence
    provenance: dict            # torch version, device, world size, git commit, resolved config


def resolve_run(cfg, rt):
    """Prepare the built-in corpus if needed, then read the corpus, the checkpoint and the model config."""
    data_dir = os.path.join(cfg["data_root"], cfg["dataset"])
    if rt.master:
        if not os.path.exists(os.path.join(data_dir, "meta.json")) and cfg["dataset"] in ("pystdlib", prepare.CLASSIFY_DEMO, prepare.SEQ2SEQ_DEMO):
            print(f"preparing the built-in corpus into {data_dir} (once)")
            prepare.prepare(name=cfg["dataset"], tokenizer=cfg["tokenizer"], out_dir=cfg["data_root"])
        data.max_ids(data_dir)  # computed once for a corpus older than these meta.json keys
    barrier()
    meta = data.max_ids(data_dir)  # no rank reads a whole split here
    tokens = [data.load_split(data_dir, s, meta) for s in ("train", "val")]
    splits = data.open_splits(data_dir, meta, cfg["objective"])
    ckpt, resuming = None, cfg["init_from"] == "resume"
    if cfg["init_from"].startswith("hf:"):  # a Hugging Face folder or hub name, as a fine-tune checkpoint
        import hf  # optional dependencies (safetensors...) only on this path
        ckpt = hf.load_checkpoint(cfg["init_from"][3:], meta, (rt.rank, rt.world) if rt.parallel == "fsdp" and cfg["objective"] == "clm" else None)
    elif cfg["init_from"] != "scratch":
        path = find_checkpoint(cfg["out_dir"] if resuming else cfg["init_from"])
        if path is None and resuming:
            raise UserError(f"init_from='resume' but {cfg['out_dir']} holds no checkpoint (ckpt-STEP.pt "
                                    f"or .dcp); use init_from='scratch' or point out_dir at the run to resume")
        ckpt = load_checkpoint(path or cfg["init_from"])
    if resuming and ckpt["step"] >= cfg["max_iters"]:
        raise UserError(f"the checkpoint {path} is at step {ckpt['step']}, max_iters={cfg['max_iters']}: nothing to train; "
                        f"raise max_iters to continue")
    trained = resuming and optimizer_of({"optimizer": "adamw", "parallel": "single", **ckpt["config"]})
    if resuming and trained != optimizer_of(cfg):  # its optimizer state would not fit
        raise UserError(f"the checkpoint was trained with optimizer={trained!r}, the config gives "
                        f"optimizer={optimizer_of(cfg)!r}: resume with --optimizer={trained}")
    mcfg = model_config(cfg, meta, ckpt["model_args"] if ckpt else None)
    if ckpt and (ckpt["meta"]["tokenizer"], ckpt["meta"]["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"]):
        raise UserError(f"the checkpoint was trained with tokenizer {ckpt['meta']['tokenizer']!r}, dataset "
                         f"{cfg['dataset']!r} uses {meta['tokenizer']!r}; prepare it with --tokenizer={ckpt['meta']['tokenizer']}")
    T = cfg["seq_len"] or mcfg.block_size  # (the model refuses one longer than its block_size)
    for split, name, tok in zip(("train", "val"), ("training", "validation"), tokens):
        if len(tok) <= T + 1:
            raise UserError(f"the {name} split has {len(tok)} tokens, not more than block_size={T}; "
                             f"use a smaller --block_size or more data")
        if meta[f"{split}_max_id"] >= mcfg.vocab_size:  # recorded by prepare.py: no pass over the data
            raise UserError(f"the {name} split holds token id {meta[f'{split}_max_id']} >= the model's vocab_size="
                             f"{mcfg.vocab_size}: the corpus does not fit this vocabulary; re-run prepare.py")
    resolved = dict(cfg, device=str(rt.device), dtype=str(rt.dtype).split(".")[-1], parallel=rt.parallel, compile=rt.compile)
    return Run(meta, data.fit_splits(splits, cfg["objective"], T, cfg["dec_len"], cfg["label_fraction"], cfg["seed"]), ckpt, resuming, mcfg, T, provenance(resolved, rt.device, rt.world))


def model_config(cfg, meta=None, ckpt_args=None):
    """The ModelConfig of a run: the preset with the config's overrides, or the checkpoint's architecture
    (only dropout and the head may change). meta: the corpus's meta.json; None keeps the preset's vocabulary."""
    head = {"mlm_nsp": "mlm_nsp", "classify": "classify"}.get(cfg["objective"], "lm")  # (span, seq2seq: the decoder's lm head)
    # the encoder objectives: bidirectional, their head, [CLS] [SEP] [MASK] [PAD] after the base vocabulary (T5: and sentinels)
    task = {} if head == "lm" else dict(head=head, causal=False, **({"n_labels": len(meta["labels"]) if meta else 2} if head == "classify" else {}))
    vocab = meta and meta["vocab_size"] + (extra := data.extra_tokens(cfg["objective"]))
    if ckpt_args is not None:
        for k in MODEL_KEYS:
            if cfg.get(k) is not None and k != "dropout" and cfg[k] != ckpt_args[k]:
                raise UserError(f"the checkpoint was trained with {k}={ckpt_args[k]!r} but the config sets {k}="
                                 f"{cfg[k]!r}: a different architecture; drop the override to use the checkpoint's")
    try:  # ModelConfig checks itself (divisible heads, known preset...): its ValueError is the user's error here
        if ckpt_args is not None:
            mcfg = M.ModelConfig(**dict(ckpt_args, **task, dropout=cfg["dropout"] if cfg["dropout"] is not None else ckpt_args["dropout"]))
        else:
            overrides = {**({"type_vocab_size": 2} if task else {}), **task, **{k: cfg[k] for k in MODEL_KEYS if cfg.get(k) is not None}}
            mcfg = M.config_from_preset(cfg["model"], **{**({"vocab_size": data.model_vocab(vocab, cfg["pad_vocab_to"])} if vocab else {}), **overrides})
    except ValueError as e:
        raise UserError(str(e)) from None
    data.check_model(cfg["objective"], mcfg.n_dec_layer, cfg["dec_len"])
    if mcfg.head != head:
        raise UserError(f"the model has head={mcfg.head!r}, objective={cfg['objective']!r} needs {head!r}: "
                         f"set objective to match the checkpoint or the preset")
    if vocab and mcfg.vocab_size < vocab:
        raise UserError(f"vocab_size={mcfg.vocab_size} is smaller than the dataset's vocabulary ({vocab}: tokenizer "
                         f"{meta['tokenizer']}{f' + {extra} special tokens' if extra else ''}): token ids would overflow the embedding")
    for key in ("seq_len", "dec_len"):
        if cfg[key] > mcfg.block_size:
            raise UserError(f"{key}={cfg[key]} is longer than the model's block_size={mcfg.block_size}: lower {key}"
                            f"{' or raise block_size' if ckpt_args is None else ' (the checkpoint fixes block_size)'}")
    return mcfg


# -----------------------------------------------------------------------------------------------
# build: the model (parallelize.py), the optimizer, and what a checkpoint restores

def optimizer_of(cfg):
    """The optimizer a config runs: optimizer='auto' is Muon, but AdamW under FSDP (Muon needs whole matrices)
    or on a torch without torch.optim.Muon (before 2.9)."""
    if cfg["optimizer"] != "auto":
        return cfg["optimizer"]
    return "adamw" if cfg["parallel"] == "fsdp" or not hasattr(torch.optim, "Muon") else "muon"


def make_optimizer(cfg, model):
    """The optimizers, a list that train_step steps together: AdamW (no decay on norms and biases), and with
    optimizer='muon' Muon over the 2-D weights inside the blocks, taken out of AdamW's groups."""
    inner = {id(p) for block in blocks_of(model) for p in block.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    to_muon = lambda p: optimizer_of(cfg) == "muon" and p.dim() == 2 and id(p) in inner
    muon, rest = [p for p in params if to_muon(p)], [p for p in params if not to_muon(p)]
    head = {id(p) for name in ("pooler", "cls_head") if model.cfg.head == "classify" for p in getattr(model, name).parameters()}
    body = [p for p in rest if id(p) not in head]
    groups = [{"params": [p for p in body if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in body if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms, biases
    if head:  # a classifier's pooler and classifier: their own multiple of the learning rate (set_lr)
        groups.append({"params": [p for p in rest if id(p) in head], "weight_decay": 0.0, "lr_mult": cfg["head_lr_mult"]})
    adamw = torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=True)
    return [adamw] + ([torch.optim.Muon(muon, lr=cfg["muon_lr"], weight_decay=cfg["weight_decay"],
                                        momentum=cfg["muon_momentum"])] if muon else [])


def get_lr(cfg, step):
    """AdamW's learning rate at `step`: linear warmup, then to min_lr at lr_decay_iters (default max_iters), by a
    cosine, or (wsd) constant and then linear over the last decay_frac of the steps. A function of the config and
    the step alone: a run resumed with a larger max_iters moves its decay to the new end."""
    end, peak, low = cfg["lr_decay_iters"] or cfg["max_iters"], cfg["learning_rate"], cfg["min_lr"]
    if step < cfg["warmup_iters"]:
        return peak * (step + 1) / cfg["warmup_iters"]
    if step >= end:
        return low
    if cfg["lr_schedule"] == "wsd":
        start = max(cfg["warmup_iters"], end - round(cfg["decay_frac"] * end))
        return peak if step < start else low + (peak - low) * (end - step) / (end - start)
    ratio = (step - cfg["warmup_iters"]) / max(1, end - cfg["warmup_iters"])
    return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - low)


def set_lr(optimizers, cfg, lr):
    """AdamW's groups at lr (a classifier's head at lr * head_lr_mult), Muon's at lr * muon_lr / learning_rate:
    one schedule for all."""
    muon = lr * cfg["muon_lr"] / cfg["learning_rate"] if cfg["learning_rate"] else 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0) if isinstance(opt, torch.optim.AdamW) else muon


COUNTERS = ("step", "best_val", "bad_evals", "last_eval")  # what a checkpoint carries besides the state dicts


@dataclass
class State:
    """The live objects of a run, and the counters the loop updates."""
    model: torch.nn.Module      # what is called: plain, compiled, DDP-wrapped or FSDP-sharded
    raw: torch.nn.Module        # the Transformer itself, for state dicts
    optimizers: list            # AdamW, and Muon with optimizer='muon' (make_optimizer)
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
    """Model, optimizer and loss scaler; from a checkpoint, the weights (fine-tune) or everything (resume)."""
    model = build_model(cfg, mcfg, rt)
    raw = model.module if rt.parallel == "ddp" else model
    s = State(model, raw, make_optimizer(cfg, raw), torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16))
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

def get_batch(run, cfg, rt, step, micro):
    """Micro-batch `micro` of training step `step` on this rank, on the device."""
    B, A = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    first = (micro * rt.world + rt.rank) * B  # this rank's rows of the global batch
    rows = data.train_batch(run.splits[0], cfg["objective"], run.T, range(first, first + B), A * rt.world * B, cfg["seed"], step)
    return data.to_device(rows, rt.device)


@torch.no_grad()
def evaluate(model, run, cfg, rt, stop=()):
    """Metrics over eval_iters fixed validation batches per rank: {"loss": the mean loss (mlm_nsp: the
    total L_MLM + L_NSP), and the head's parts and accuracies, data.METRICS}; None if a signal came (`stop`)."""
    model.eval()
    head, B, n = run.mcfg.head, cfg["batch_size"], cfg["eval_iters"] * rt.world  # the same rows at every world size
    total = torch.zeros(2 * len(data.METRICS[head]), device=rt.device, dtype=torch.float64)
    for i in range(rt.rank, n, rt.world):
        if signalled(stop, rt):  # a signal ends the evaluation at once: the checkpoint must not wait for it
            model.train()
            return None
        batch = data.to_device(data.eval_batch(run.splits[1], cfg["objective"], run.T, range(i * B, (i + 1) * B), n * B), rt.device)
        with rt.autocast():
            logits, loss = model(**batch)
        total += data.metric_sums(head, logits, loss, batch)
    model.train()
    return data.metrics_from_sums(head, to_host(all_reduce_sum(total)))


def signalled(stop, rt):
    """Whether any rank got SIGTERM/SIGINT (`stop`): across ranks that takes a collective, so only then."""
    return bool(stop) if rt.world == 1 else to_host(all_reduce_sum(torch.tensor([float(bool(stop))], device=rt.device)))[0] > 0


def forward_backward(s, batches, cfg, rt):
    """Forward and backward over one step's micro-batches, reducing gradients on the last one only, then
    unscale and clip. Returns (summed loss, gradient norm, summed data.metric_sums, 0 for the lm head)."""
    A, head, loss_sum, sums = cfg["gradient_accumulation_steps"], s.raw.cfg.head, 0.0, 0
    for micro, batch in enumerate(batches):
        last = micro == A - 1
        if rt.parallel == "fsdp":
            s.model.set_requires_gradient_sync(last or cfg["fsdp_grad_sync"] == "micro")
        with s.model.no_sync() if rt.parallel == "ddp" and not last else nullcontext(), rt.autocast():
            logits, loss = s.model(**batch)
            if head != "lm":  # the loss parts and accuracies, for the log line
                sums = sums + data.metric_sums(head, logits, loss, batch)
            loss = loss / A
        s.scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    for opt in s.optimizers:
        s.scaler.unscale_(opt)
    return loss_sum, torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg["grad_clip"] or float("inf")), sums


def train_step(s, batches, cfg, rt, lr, flags=()):
    """One optimizer step at learning rate lr: forward/backward, then the step's one collective and its one
    device-to-host read (the loss, whether any rank saw a non-finite loss or gradient norm, and the host
    `flags`, e.g. "this rank got a signal"), then the update, skipped when non-finite (fp16: the scaler
    decides); max_bad_steps such steps in a row stop the run.
    Returns (mean loss, the flags summed over ranks, metric sums, whether the step was skipped as bad)."""
    set_lr(s.optimizers, cfg, lr)
    if s.raw.cfg.dropout:  # dropout, a step's only randomness, as a function of the step, so resume is exact (reseeding
        torch.manual_seed(M.mix_seed(cfg["seed"], s.step * 1009 + rt.rank))  # costs 1.4 ms: it walks every device type)
    loss_sum, norm, sums = forward_backward(s, batches, cfg, rt)
    host = torch.tensor([float(f) for f in flags], dtype=torch.float32)
    host = host.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else host.to(rt.device)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor (no communication)
    nonfinite = (~torch.isfinite(loss_sum.float()) | ~torch.isfinite(norm)).float()
    loss, bad_ranks, *flags = to_host(all_reduce_sum(torch.cat([loss_sum.float().view(1), nonfinite.view(1), host])))
    loss /= rt.world
    if not bad_ranks or s.scaler.is_enabled():  # fp16: the scaler skips inf gradients and lowers its scale
        for opt in s.optimizers:
            s.scaler.step(opt)
    s.scaler.update()
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    s.step += 1
    bad = not math.isfinite(loss) or (bool(bad_ranks) and not s.scaler.is_enabled())
    s.bad_run = s.bad_run + 1 if bad else 0
    if bad:
        log(rt, f"step {s.step}: non-finite loss {loss} or gradient norm on {bad_ranks:.0f} rank(s): update skipped ({s.bad_run} in a row)")
    if s.bad_run >= cfg["max_bad_steps"]:
        raise UserError(f"stopping at step {s.step}: {s.bad_run} non-finite steps in a row at lr {lr:.2e}; "
                           f"the last good checkpoint is {s.saved_path}; resume from it with a lower "
                           f"learning_rate (or more warmup_iters, or grad_clip)")
    return loss, flags, sums, bad


def eval_step(s, cfg, rt, run, summary, stop, meter):
    """Evaluate, note the best, checkpoint when due. Returns True when the run ends: early stopping, or a
    signal during the evaluation."""
    metrics = evaluate(s.model, run, cfg, rt, stop)
    if metrics is None:
        return preempt(s, cfg, rt, run, summary)
    val_loss = metrics["loss"]
    improved = val_loss < s.best_val
    s.best_val, s.bad_evals = (val_loss, 0) if improved else (s.best_val, s.bad_evals + 1)
    s.last_eval = s.step
    summary["evals"].append((s.step, val_loss))
    summary["metrics"] = metrics
    log_eval(s, cfg, rt, meter, metrics, improved)
    if s.step > 0 and (improved or not cfg["checkpoint_interval"]):
        save(s, cfg, rt, run, best=improved)
    if cfg["patience"] and s.bad_evals >= cfg["patience"]:
        log(rt, f"early stop: no improvement in {s.bad_evals} evaluations (best {s.best_val:.4f})")
        summary["stopped_early"] = True
    return summary["stopped_early"]


def preempt(s, cfg, rt, run, summary):
    """A signal came: checkpoint this step and end the run (resume continues from here)."""
    save(s, cfg, rt, run)
    log(rt, f"signal received: checkpoint at step {s.step} written to {s.saved_path}; exiting")
    summary["preempted"] = True
    return True


def save(s, cfg, rt, run, best=False):
    """Checkpoint ckpt-STEP (once per step) and, if `best`, best; keep the newest keep_last ckpt-STEP.
    Never saves non-finite weights; a failed write names the previous checkpoint, which stays intact."""
    if not cfg["save_checkpoints"] or (s.saved_step == s.step and not best):
        return
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in s.raw.parameters())
    if to_host(all_reduce_sum(torch.tensor([bad], device=rt.device)))[0]:
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
    losses, the evaluations, the final step, best validation loss and model."""
    rt = setup(check_config(cfg))
    run = resolve_run(cfg, rt)
    with dir_lock(cfg["out_dir"]) if rt.master else nullcontext(), open_sinks(cfg, rt, run) as sinks:  # one run at a time writes to out_dir
        s = build(cfg, rt, run.mcfg, run.ckpt, run.resuming)
        meter = log_start(s, cfg, rt, run, sinks)
        summary = {"train_losses": [], "evals": [], "stopped_early": False, "bad_steps": 0}
        stop = []  # the signals received
        with catch_signals(stop):
            while True:
                if (s.step % cfg["eval_interval"] == 0 or s.step == cfg["max_iters"]) and s.step != s.last_eval:
                    if eval_step(s, cfg, rt, run, summary, stop, meter):
                        break
                if s.step >= cfg["max_iters"]:
                    break
                t_step, lr = time.time(), get_lr(cfg, s.step)
                batches = (get_batch(run, cfg, rt, s.step, micro) for micro in range(cfg["gradient_accumulation_steps"]))
                timed = cfg["checkpoint_every_minutes"] and time.time() - s.saved_time > 60 * cfg["checkpoint_every_minutes"]
                loss, (signal_seen, due), sums, bad = train_step(s, batches, cfg, rt, lr, (bool(stop), bool(timed)))
                meter.sums = meter.sums + sums  # summed until the next log line
                summary["train_losses"].append(loss)
                summary["bad_steps"] += bad
                if signal_seen and preempt(s, cfg, rt, run, summary):
                    break
                if (cfg["checkpoint_interval"] and s.step % cfg["checkpoint_interval"] == 0) or due:
                    save(s, cfg, rt, run)
                log_step(s, cfg, rt, meter, loss, lr, time.time() - t_step)
    summary.update(step=s.step, best_val=s.best_val, model=s.raw, wall_s=time.time() - meter.t0)
    return summary


def main(argv):
    """The command line. A user error, or running out of GPU memory, is one line on stderr and exit status 2;
    anything else is a bug and keeps its traceback."""
    if {"-h", "--help"} & set(argv):
        return print(usage(__doc__, DEFAULTS, RULES)) or 0
    try:
        config = get_config(argv)
        train(config)
    except UserError as e:
        return print(f"train.py: error: {e}", file=sys.stderr) or 2
    except torch.cuda.OutOfMemoryError:
        return print(f"train.py: error: out of GPU memory at batch_size={config['batch_size']}, seq_len={config['seq_len'] or 'block_size'}, "
                     f"activation_checkpointing={config['activation_checkpointing']!r}: lower batch_size (raise gradient_accumulation_steps to "
                     f"keep the global batch), shorten seq_len, or set activation_checkpointing='full'", file=sys.stderr) or 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
