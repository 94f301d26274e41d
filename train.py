"""
Train a Transformer. With no arguments this is the quickstart: the tiny model on the built-in
pystdlib corpus (prepared on first use), on the best device present.

    python train.py                                   # quickstart
    python train.py config/gpt2_124m.py --batch_size=8  # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama_7b.py   # DDP / FSDP

Every name in the defaults block below can be set by a config file (plain Python assignments)
or by --key=value (parsed with ast.literal_eval). An unknown key or a value of the wrong type
stops the run before any work, naming the closest valid key.
"""
import ast
import builtins
import difflib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

import model as M
import prepare
from checkpoint import barrier, dist_on, find_checkpoint, load_checkpoint, prune_checkpoints, restore, save_checkpoint

# -----------------------------------------------------------------------------------------------
# defaults
# I/O
out_dir = "out"
init_from = "scratch"       # 'scratch' | 'resume' (latest checkpoint in out_dir) | a checkpoint path (fine-tune)
eval_interval = 250         # evaluate (and checkpoint) every this many steps
eval_iters = 32             # validation batches per evaluation: a fixed set, comparable across runs
log_interval = 50
patience = 0                # early stopping: stop after this many evaluations without improvement (0: off)
save_checkpoints = True
checkpoint_interval = 0     # save every this many steps; 0: at every evaluation
checkpoint_every_minutes = 0.0  # also save when this much time has passed since the last save (0: off)
keep_last = 2               # checkpoints kept (ckpt-STEP.pt / .dcp), plus best.pt; older ones deleted after a save
max_bad_steps = 10          # stop after this many non-finite (NaN/inf) steps in a row; each one is skipped
# data
data_root = "data"
dataset = "pystdlib"        # data_root/dataset/{train.bin,val.bin,meta.json}, see prepare.py
tokenizer = "bytes"         # used only when the built-in dataset has to be prepared
objective = "clm"           # 'clm' next token | 'mlm_nsp' BERT's masked LM + next sentence | 'classify' labelled text
seq_len = 0                 # tokens per sequence; 0: the model's block_size (BERT: 128, then 512, one position table)
batch_size = 8              # sequences per micro-step per rank (small batches, many steps: best for a CPU budget)
gradient_accumulation_steps = 1  # micro-steps per optimizer step; global batch = batch_size * this * world
# model: a preset from model.PRESETS; the fields after it override the preset (None: keep the preset's)
model = "tiny"
vocab_size = None           # None: the dataset's vocabulary (meta.json)
block_size = None
n_layer = None
n_head = None
n_kv_head = None
n_embd = None
ffn_hidden = None
norm = None
mlp = None
pos = None
rope_theta = None
tie_embeddings = None
bias = None
dropout = None
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 3e-3
max_iters = 3000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0: off
warmup_iters = 100
lr_decay_iters = None       # None: max_iters
min_lr = 3e-4
# system
device = "auto"             # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"              # 'auto' (bfloat16 on cuda if supported, else float16; float32 elsewhere) | 'float32' | 'bfloat16' | 'float16'
compile = None              # torch.compile; None: on for cuda, off elsewhere (on CPU it costs ~40 s and gains nothing)
threads = 0                 # CPU threads per process; 0: all cores, split between local ranks
seed = 1337
parallel = "auto"           # 'auto' (ddp under torchrun, else single) | 'single' | 'ddp' | 'fsdp'
activation_checkpointing = "none"  # 'none' | 'full': recompute each block in the backward pass
dist_timeout_minutes = 10   # a collective that waits longer than this (a dead rank) fails instead of hanging
# -----------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str, type(None)))}
MODEL_KEYS = [f.name for f in fields(M.ModelConfig)]
# the types of keys whose default is None ("not set"): the model fields, and two more
NONE_TYPES = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]
              for f in fields(M.ModelConfig)} | {"compile": bool, "lr_decay_iters": int}


def check_value(key, value):
    """Raise a ValueError unless `value` fits the type of `key`'s default."""
    default = DEFAULTS[key]
    want = type(default) if default is not None else NONE_TYPES.get(key)
    if value is None and default is None or want is None:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise ValueError(f"config key {key!r} expects {want.__name__} (default {default!r}), "
                         f"got {type(value).__name__} {value!r}")
    return value


def unknown_key(key):
    close = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; see the defaults at the top of train.py"
    return ValueError(f"unknown config key {key!r}{hint}")


def get_config(argv):
    """Defaults, then config files (in order), then --key=value overrides. Returns a plain dict."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            scope = {}
            with open(arg) as f:  # a config file is trusted Python, like train.py itself
                exec(builtins.compile(f.read(), arg, "exec"), {}, scope)  # (`compile` is a config key here)
            items = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
                     and type(v).__name__ != "module"}
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --dataset=shakespeare
            items = {key: value}
        for key, value in items.items():
            if key not in DEFAULTS:
                raise unknown_key(key)
            cfg[key] = check_value(key, value)
    return cfg


# -----------------------------------------------------------------------------------------------
# data: see prepare.py for the format

def load_dataset(cfg, rank):
    data_dir = os.path.join(cfg["data_root"], cfg["dataset"])
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and cfg["dataset"] in ("pystdlib", prepare.CLASSIFY_DEMO) and rank == 0:
        print(f"preparing the built-in corpus into {data_dir} (once)")
        prepare.prepare(name=cfg["dataset"], tokenizer=cfg["tokenizer"], out_dir=cfg["data_root"])
    barrier()
    meta = prepare.load_meta(data_dir)
    return meta, prepare.load_split(data_dir, "train", meta), prepare.load_split(data_dir, "val", meta)


def window_batch(data, starts, T, device):
    """Rows data[s:s+T] as inputs and data[s+1:s+T+1] as next-token targets, (B, T) each."""
    x = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + T + 1] for s in starts]).astype(np.int64))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(data, cfg, T, step, micro, rank, world, device):
    """One micro-batch of training data as the model's keyword arguments. `data`: the token array, or for
    the encoder objectives the split indexed by prepare.encoder_corpus."""
    if isinstance(data, dict):
        first = (micro * world + rank) * cfg["batch_size"]  # this rank's slice of the global batch, as in train_starts
        return encoder_batch(cfg, data, T, device, range(first, first + cfg["batch_size"]), step)
    x, y = window_batch(data, train_starts(cfg, len(data), T, step, micro, rank, world), T, device)
    return {"idx": x, "targets": y}


def encoder_batch(cfg, corpus, T, device, rows, step=None):
    """MLM+NSP pairs or labelled examples (prepare.encoder_batch) for global row numbers `rows`, as tensors:
    drawn from (seed, step, row) in training, so like train_starts they need no state to resume; the
    fixed validation rows without a step."""
    b = prepare.encoder_batch(corpus, T, cfg["objective"], rows, None if step is None else cfg["seed"], step)
    b = {k: torch.from_numpy(v) for k, v in b.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v.to(device) for k, v in b.items()}


def train_starts(cfg, n_tokens, T, step, micro, rank, world):
    """The window starts of one micro-batch on one rank: a pure function of (seed, step), so resuming at
    a step needs no sampler state, and every world size splits the same global batch."""
    B, A = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
    starts = torch.randint(n_tokens - T - 1, (A * world * B,), generator=g)
    i = (micro * world + rank) * B
    return starts[i:i + B].tolist()


def eval_starts(n_tokens, T, n):
    """n evenly spaced windows over the validation split: the same every evaluation and every run."""
    return np.linspace(0, n_tokens - T - 1, n).astype(np.int64).tolist()


# -----------------------------------------------------------------------------------------------
# distributed helpers: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; we use PyTorch's collectives only

def all_reduce_sum(t):
    if dist_on():
        torch.distributed.all_reduce(t)
    return t


def setup(cfg):
    """Device, dtype and the process group. Returns (device, ptdtype, rank, world, parallel)."""
    from datetime import timedelta
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = cfg["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dev == "cuda" and world > 1:
        dev = f"cuda:{local_rank}"
    device = torch.device(dev)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available; use --device=cpu")
        torch.cuda.set_device(device)
    parallel = cfg["parallel"]
    if parallel == "auto":
        parallel = "ddp" if "RANK" in os.environ else "single"
    if parallel not in ("single", "ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r} is not one of 'auto', 'single', 'ddp', 'fsdp'")
    if parallel != "single" and "RANK" not in os.environ:
        raise ValueError(f"parallel={parallel!r} needs torchrun: torchrun --nproc_per_node=N train.py ...")
    dt = cfg["dtype"]
    if dt == "auto":
        dt = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    if dt not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dt!r} is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    if dt == "float16" and parallel == "fsdp":
        raise ValueError("dtype='float16' with FSDP is not supported (its loss scaler is not wired in); use bfloat16")
    if dt == "float16" and device.type == "cpu":
        raise ValueError("dtype='float16' needs a GPU (fp16 on CPU is slow and unsupported by the loss scaler); "
                         "use --dtype=float32 (or bfloat16)")
    if dt == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bfloat16' is not supported by {torch.cuda.get_device_name(device)}; use float16")
    if cfg["compile"] is None:
        cfg["compile"] = device.type == "cuda"
    if cfg["compile"] and not (torch._dynamo.is_dynamo_supported() and device.type in ("cpu", "cuda")):
        raise ValueError(f"compile=True is not supported here (Python {sys.version.split()[0]}, device "
                         f"{device.type}); use --compile=False")
    if cfg["activation_checkpointing"] not in ("none", "full"):
        raise ValueError(f"activation_checkpointing={cfg['activation_checkpointing']!r} is not 'none' or 'full'")
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if "RANK" in os.environ and not dist_on():  # under torchrun, even at world size 1 (DDP needs a group)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(minutes=cfg["dist_timeout_minutes"]))
    return device, getattr(torch, dt), rank, world, parallel


# -----------------------------------------------------------------------------------------------
# model: built on the meta device, parallelised from outside, then materialised and initialised

def model_config(cfg, meta, ckpt_args=None):
    heads = {"clm": "lm", "mlm_nsp": "mlm_nsp", "classify": "classify"}
    if cfg["objective"] not in heads:
        raise ValueError(f"objective={cfg['objective']!r} is not one of {list(heads)}")
    head = heads[cfg["objective"]]
    # the encoder objectives: bidirectional, their head, [CLS] [SEP] [MASK] [PAD] after the base vocabulary
    task = {} if head == "lm" else dict(head=head, causal=False, **({"n_labels": len(meta["labels"])} if head == "classify" else {}))
    vocab = meta["vocab_size"] + (prepare.N_SPECIAL if task else 0)
    if ckpt_args is not None:  # resume / fine-tune: the checkpoint's architecture; only dropout (and the head) may change
        for k in MODEL_KEYS:
            if cfg.get(k) is not None and k != "dropout" and cfg[k] != ckpt_args[k]:
                raise ValueError(f"the checkpoint was trained with {k}={ckpt_args[k]!r} but the config sets {k}="
                                 f"{cfg[k]!r}: a different architecture; drop the override to use the checkpoint's")
        mcfg = M.ModelConfig(**dict(ckpt_args, **task, dropout=cfg["dropout"] if cfg["dropout"] is not None else ckpt_args["dropout"]))
    else:
        overrides = {**({"type_vocab_size": 2} if task else {}), **task, **{k: cfg[k] for k in MODEL_KEYS if cfg.get(k) is not None}}
        mcfg = M.config_from_preset(cfg["model"], **{"vocab_size": vocab, **overrides})
    if mcfg.head != head:
        raise ValueError(f"the model has head={mcfg.head!r}, objective={cfg['objective']!r} needs {head!r}: "
                         f"set objective to match the checkpoint or the preset")
    if mcfg.vocab_size < vocab:
        raise ValueError(f"vocab_size={mcfg.vocab_size} is smaller than the dataset's vocabulary ({vocab}: tokenizer "
                         f"{meta['tokenizer']}{' + 4 special tokens' if task else ''}): token ids would overflow the embedding")
    return mcfg


def checkpointed(block):
    """Activation checkpointing by wrapping forward in place: parameter names stay unchanged."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward
    block.forward = lambda *args, **kw: checkpoint(inner, *args, use_reentrant=False, **kw)


def build_model(cfg, mcfg, device, ptdtype, parallel, world):
    with torch.device("meta"):
        model = M.Transformer(mcfg)
    for block in model.blocks:
        if cfg["activation_checkpointing"] == "full":
            checkpointed(block)
        if cfg["compile"] and parallel == "fsdp":  # per block, so FSDP can overlap communication
            block.compile()
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch 2.6 keeps FSDP2 under _composable
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    init_params(model, cfg["seed"], device)
    if cfg["compile"] and parallel != "fsdp":
        model.compile()  # in place: state_dict keys stay free of _orig_mod.
    return model


@torch.no_grad()
def init_params(model, seed, device):
    """Every parameter (or its local shard) gets exactly the value a single-process init gives."""
    for name, p in model.named_parameters():
        full = model.init_tensor(name, p.shape, seed, device)
        if hasattr(p, "to_local"):  # an FSDP2 DTensor sharded on dim 0: copy this rank's chunk
            local = p.to_local()
            chunks = full.chunk(p.device_mesh.size(), dim=0)
            rank = p.device_mesh.get_local_rank()
            if local.numel():
                local.copy_(chunks[rank])
        else:
            p.copy_(full)
    model.init_buffers()


def make_optimizer(cfg, model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms, biases
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


def get_lr(cfg, step):
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / cfg["warmup_iters"]
    if step >= decay_iters:
        return cfg["min_lr"]
    ratio = (step - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


# -----------------------------------------------------------------------------------------------

def autocast(device, ptdtype, parallel):
    """bf16/fp16 autocast, except under FSDP, which casts through its MixedPrecisionPolicy instead."""
    return torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 and parallel != "fsdp" else nullcontext()


def forward_backward(model, optimizer, scaler, batches, cfg, ctx, parallel, head="lm"):
    """Forward and backward over one step's micro-batches, reducing gradients on the last one only, then
    unscale and clip. Returns (summed loss, gradient norm, summed M.metric_sums, 0 for the lm head);
    applying the update is left to the caller."""
    A, loss_sum, sums = cfg["gradient_accumulation_steps"], 0.0, 0
    for micro, batch in enumerate(batches):
        last = micro == A - 1
        if parallel == "fsdp":
            model.set_requires_gradient_sync(last)  # reduce-scatter gradients only once per step
        with model.no_sync() if parallel == "ddp" and not last else nullcontext(), ctx:
            logits, loss = model(**batch)
            if head != "lm":  # the loss parts and accuracies, for the log line
                sums = sums + M.metric_sums(head, logits, loss, batch)
            loss = loss / A
        scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    scaler.unscale_(optimizer)
    return loss_sum, torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf")), sums


@torch.no_grad()
def evaluate(model, val, cfg, T, device, ctx, rank, world, head="lm"):
    """Metrics over eval_iters fixed validation batches per rank: {"loss": the mean loss (mlm_nsp: the
    total L_MLM + L_NSP), and the head's parts and accuracies, M.METRICS}. `val` as in get_batch."""
    model.eval()
    n_batches, B = cfg["eval_iters"] * world, cfg["batch_size"]  # the same rows at every world size with the same global batch
    starts = None if isinstance(val, dict) else eval_starts(len(val), T, n_batches * B)
    total = torch.zeros(2 * len(M.METRICS[head]), device=device, dtype=torch.float64)
    for i in range(rank, n_batches, world):
        if starts is None:
            batch = encoder_batch(cfg, val, T, device, range(i * B, (i + 1) * B))
        else:
            x, y = window_batch(val, starts[i * B:(i + 1) * B], T, device)
            batch = {"idx": x, "targets": y}
        with ctx:
            logits, loss = model(**batch)
        total += M.metric_sums(head, logits, loss, batch)
    model.train()
    return M.summarize(head, all_reduce_sum(total))


def train(cfg):
    """Run training with the resolved config dict. Returns a summary (losses, evaluations, step)."""
    device, ptdtype, rank, world, parallel = setup(cfg)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    B, A = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    meta, train_data, val = load_dataset(cfg, rank)
    src = (train_data, val) if cfg["objective"] == "clm" else [  # encoder objectives: documents, line ends, labels indexed once
        prepare.encoder_corpus(os.path.join(cfg["data_root"], cfg["dataset"]), s, meta, cfg["objective"]) for s in ("train", "val")]

    ckpt, resuming = None, cfg["init_from"] == "resume"
    if resuming:
        path = find_checkpoint(cfg["out_dir"])
        if path is None:
            raise FileNotFoundError(f"init_from='resume' but {cfg['out_dir']} holds no checkpoint (ckpt-STEP.pt "
                                    f"or .dcp); use init_from='scratch' or point out_dir at the run to resume")
        ckpt = load_checkpoint(path)
    elif cfg["init_from"] != "scratch":
        ckpt = load_checkpoint(cfg["init_from"])
    mcfg = model_config(cfg, meta, ckpt["model_args"] if ckpt else None)
    if ckpt and (ckpt["meta"]["tokenizer"], ckpt["meta"]["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"]):
        raise ValueError(f"the checkpoint was trained with tokenizer {ckpt['meta']['tokenizer']!r}, dataset "
                         f"{cfg['dataset']!r} uses {meta['tokenizer']!r}; prepare it with --tokenizer={ckpt['meta']['tokenizer']}")
    T = cfg["seq_len"] or mcfg.block_size  # (the model refuses one longer than its block_size)
    for name, split in (("training", train_data), ("validation", val)):
        if len(split) <= T + 1:
            raise ValueError(f"the {name} split has {len(split)} tokens, not more than block_size={T}; "
                             f"use a smaller --block_size or more data")
        if int(split.max()) >= mcfg.vocab_size:  # one pass over the data, before any compute
            raise ValueError(f"the {name} split holds token id {int(split.max())} >= the model's vocab_size="
                             f"{mcfg.vocab_size}: the .bin does not match meta.json; re-run prepare.py")

    model = build_model(cfg, mcfg, device, ptdtype, parallel, world)
    raw_model = model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    optimizer = make_optimizer(cfg, raw_model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    step, best_val, bad_evals = 0, float("inf"), 0
    if ckpt and not resuming and ckpt["model_args"].get("head", "lm") != mcfg.head:  # fine-tune onto another head
        if "model" not in ckpt:
            raise ValueError("fine-tuning onto another head needs a .pt checkpoint: export the sharded one with "
                             "python sample.py --ckpt=PATH.dcp --export=FILE.pt")
        ckpt["model"] = M.adapt_heads(ckpt["model"], raw_model, cfg["seed"])
    if ckpt:  # resume: weights, optimizer and counters; fine-tune: weights only
        restore(ckpt, raw_model, optimizer if resuming else None)
    if resuming:
        scaler.load_state_dict(ckpt["scaler"])
        step, best_val, bad_evals = ckpt["step"], ckpt["best_val"], ckpt["bad_evals"]
    ctx = autocast(device, ptdtype, parallel)

    log(json.dumps({k: cfg[k] for k in DEFAULTS}, indent=None))
    log(f"model {cfg['model']}: {raw_model.num_params():,} parameters; {asdict(mcfg)}")
    tokens_per_step = B * A * world * T
    flops_tok = M.flops_per_token(mcfg, T)
    peak, peak_src = M.peak_flops(device, ptdtype)
    log(f"device {device} {str(ptdtype).split('.')[-1]}, parallel={parallel} world={world}, "
        f"{tokens_per_step:,} tokens/step, MFU vs {peak / 1e12:.2f} TFLOP/s ({peak_src})")
    shard = world if parallel == "fsdp" else 1  # fp32 weights and grads, AdamW's two fp32 moments
    log("per-rank memory estimate: " + ", ".join(f"{k} {b * raw_model.num_params() / shard / 2**30:.2f} GiB" for k, b in
                                                  (("params", 4), ("grads", 4), ("optimizer", 8))) + " + activations")
    out = cfg["out_dir"]
    if master:
        os.makedirs(out, exist_ok=True)

    def write_log(rec):
        if master:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    saved = {"step": step if resuming else -1, "time": time.time(), "path": find_checkpoint(out)}

    def save(best=False):
        """Checkpoint ckpt-STEP (and best), never a non-finite model; keep the newest keep_last."""
        if not cfg["save_checkpoints"] or (saved["step"] == step and not best):
            return
        bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                  for p in raw_model.parameters())
        if all_reduce_sum(torch.tensor(bad, device=device)).item():
            raise RuntimeError(f"refusing to save a model with non-finite weights at step {step}")
        extra = {"scaler": scaler.state_dict(), "step": step, "best_val": best_val, "bad_evals": bad_evals,
                 "last_eval": last_eval, "config": cfg, "model_args": asdict(mcfg), "meta": meta}
        names = ([f"ckpt-{step:07d}"] if saved["step"] != step else []) + (["best"] if best else [])
        for name in names:
            try:
                save_checkpoint(os.path.join(out, name), raw_model, optimizer, extra, parallel, master)
            except OSError as e:
                raise OSError(f"could not write checkpoint {name} to {out} ({e}); the previous checkpoint "
                              f"{saved['path']} is intact: free space or fix permissions, then resume") from e
        if master:
            prune_checkpoints(out, cfg["keep_last"])
        saved.update(step=step, time=time.time(), path=find_checkpoint(out))

    stop = []  # SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, checkpoint, exit cleanly
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.append(signum))

    summary = {"train_losses": [], "evals": [], "stopped_early": False, "bad_steps": 0}
    t0, dt_ema, bad_run, sums = time.time(), None, 0, 0
    last_eval = ckpt["last_eval"] if resuming else -1  # a resumed run does not repeat an evaluation
    while True:
        if (step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]) and step != last_eval:
            metrics = evaluate(model, src[1], cfg, T, device, ctx, rank, world, mcfg.head)
            val_loss, parts = metrics["loss"], {k: v for k, v in metrics.items() if k != "loss"}
            improved = val_loss < best_val
            best_val, bad_evals = (val_loss, 0) if improved else (best_val, bad_evals + 1)
            summary["evals"].append((step, val_loss))
            summary["metrics"] = metrics
            last_eval = step
            log(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})"
                + "".join(f", {k} {v:.4f}" for k, v in parts.items()) + f"{' best' if improved else ''}")
            write_log({"step": step, "val_loss": val_loss, **{f"val_{k}": v for k, v in parts.items()}})
            if step > 0 and (improved or not cfg["checkpoint_interval"]):
                save(best=improved)
            if cfg["patience"] and bad_evals >= cfg["patience"]:
                log(f"early stop: no improvement in {bad_evals} evaluations (best {best_val:.4f})")
                summary["stopped_early"] = True
                break
        if step >= cfg["max_iters"]:
            break

        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step = time.time()
        torch.manual_seed(cfg["seed"] * 1_000_003 + step * 1009 + rank)  # dropout: a function of the step, so resume is exact
        batches = (get_batch(src[0], cfg, T, step, micro, rank, world, device) for micro in range(A))
        loss_sum, norm, step_sums = forward_backward(model, optimizer, scaler, batches, cfg, ctx, parallel, mcfg.head)
        sums = sums + step_sums  # summed until the next log line
        # one collective per step: the loss, and whether any rank saw a signal or wants a timed save
        timed = cfg["checkpoint_every_minutes"] and time.time() - saved["time"] > 60 * cfg["checkpoint_every_minutes"]
        flags = all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(bool(stop)), device=device),
                                            torch.tensor(float(bool(timed)), device=device)]))
        train_loss = flags[0].item() / world
        finite = math.isfinite(train_loss) and bool(torch.isfinite(norm))
        if finite or scaler.is_enabled():  # fp16: the scaler skips inf gradients and lowers its scale
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        summary["train_losses"].append(train_loss)
        bad = not math.isfinite(train_loss) or (not finite and not scaler.is_enabled())
        bad_run = bad_run + 1 if bad else 0
        summary["bad_steps"] += bad
        if bad:
            log(f"step {step}: non-finite loss {train_loss} or gradient norm {norm.item()}: update skipped "
                f"({bad_run} in a row)")
            if bad_run >= cfg["max_bad_steps"]:
                raise RuntimeError(f"stopping at step {step}: {bad_run} non-finite steps in a row at lr {lr:.2e}; "
                                   f"the last good checkpoint is {saved['path']}; resume from it with a lower "
                                   f"learning_rate (or more warmup_iters, or grad_clip)")
        if (cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0) or flags[1] or flags[2]:
            save()
        if flags[1]:
            log(f"signal received: checkpoint at step {step} written to {saved['path']}; exiting")
            summary["preempted"] = True
            break
        dt = time.time() - t_step
        dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
        if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
            tok_s = tokens_per_step / dt_ema
            parts = {k: v for k, v in M.summarize(mcfg.head, all_reduce_sum(sums)).items() if k != "loss"} if mcfg.head != "lm" else {}
            sums = 0
            mfu = flops_tok * tok_s / (peak * world)
            eta = dt_ema * (cfg["max_iters"] - step)
            write_log({"step": step, "loss": round(train_loss, 4), "lr": lr, "tok_s": round(tok_s), "mfu": round(mfu, 4),
                       "ms_step": round(dt_ema * 1000, 1), "eta_s": round(eta), "elapsed_s": round(time.time() - t0, 1),
                       **{k: round(v, 4) for k, v in parts.items()}})
            mem = (f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated "
                   f"{torch.cuda.max_memory_reserved(device) / 2**30:.1f} reserved" if device.type == "cuda" else "")
            log(f"step {step}: loss {train_loss:.4f}" + "".join(f", {k} {v:.3f}" for k, v in parts.items()) +
                f", lr {lr:.2e}, {tok_s:,.0f} tok/s, MFU {mfu:.1%}, "
                f"{dt_ema * 1000:.1f} ms/step, ETA {eta / 60:.1f} min{mem}")
    summary.update(step=step, best_val=best_val, model=raw_model, wall_s=time.time() - t0)
    return summary


if __name__ == "__main__":
    try:
        config = get_config(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"config error: {e}")
    train(config)
    if dist_on():
        torch.distributed.destroy_process_group()
