"""
Benchmark anvil's training step, or estimate the memory of a run too big for this machine.

    python bench.py                                      # the quickstart model: tiny, batch 8, block 256
    python bench.py --model=gpt2 --block_size=256 --batch_size=4 --compare compile=False,compile=True
    python bench.py config/my_run.py --json=bench.json --profile
    python bench.py --estimate llama-7b --gpus 64 --parallel fsdp --batch_size=1
    python bench.py --prepare=300                        # prepare.py's tokenizing throughput, gpt2 BPE, 300 MB

Every argument that is not a bench option goes to train.get_config, so presets, config files and
--key=value mean exactly what they mean to train.py, and the model is built by train.py's own
functions (compile, dtype, activation checkpointing behave the same). Bench options:
  --steps=N (10), --warmup=N (3)  timed and untimed steps, per variant
  --synthetic          random token ids, the preset's vocabulary (also used when the dataset is not
                       prepared). Otherwise the batches are windows of the dataset, as in train.py.
  --compare=A,B,...    variants, each key=value[+key=value...], built once and timed in alternating
                       rounds (A B, B A, ...) so their ratio survives a noisy machine
  --json               print only one JSON object on stdout (the log goes to stderr); --json=PATH
                       writes it to PATH and keeps the log on stdout
  --profile[=PATH]     a torch.profiler chrome trace of 3 steps (default bench_trace.json)
  --peak_tflops=X      MFU against X TFLOP/s instead of common.peak_flops (spec table or measured)
  --estimate[=PRESET] --gpus=N   per-GPU memory of params, grads, AdamW state and activations;
                       allocates nothing. --parallel, --dtype, --batch_size, --block_size apply; a PRESET that
                       one config file names (config/llama_7b.py: llama-7b) takes that file's settings first.
  --prepare[=MB]       tokens/s of prepare.py (gpt2 BPE, 1 and all worker processes) on MB (300) of text, the
                       stdlib's .py files repeated as .jsonl, against a plain single-process loop of
                       encode_ordinary over the same documents; PREPARE_ROUNDS alternating rounds, medians
A bench option or train.py key that takes a value may also be given as '--key value'. User errors: one
line on stderr, exit status 2.
"""
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch

import data
import model as M
import prepare
import readers
import train
from common import (UserError, at_least, check_value, destroy_distributed, flops_per_token, mfu, nonempty, one_of,
                    parse_config, peak_flops, provenance, rule, state_bytes, unsharded_grads, usage)
from parallelize import blocks_of

OPTIONS = dict(steps=10, warmup=3, synthetic=False, compare=None, json=None, profile=None, peak_tflops=None,
               estimate=None, gpus=1, prepare=None)
KV = rule("key=value[+key=value...],...", lambda v: all("=" in kv for item in v.split(",") for kv in item.split("+")),
          ["n_layer"])
RULES = dict(steps=Annotated[int, at_least(1)], warmup=Annotated[int, at_least(0)], synthetic=bool,
             compare=Annotated[str, KV], json=Annotated[str, nonempty], profile=Annotated[str, nonempty],
             peak_tflops=Annotated[float, at_least(1e-6)], estimate=Annotated[str, one_of(*M.PRESETS)],
             gpus=Annotated[int, at_least(1)], prepare=Annotated[int, at_least(1)])
FLAGS = ("synthetic", "json", "profile", "estimate", "prepare")  # may stand alone
STRINGS = ("compare", "json", "profile", "estimate")  # taken verbatim; the others via ast.literal_eval
PEAKS = {}  # (device, dtype, threads) -> (peak FLOP/s, where it comes from)


def parse_args(argv):
    """Split argv into bench options and the arguments for train.get_config."""
    opts, rest, argv = dict(OPTIONS), [], list(argv)
    while argv:
        arg = argv.pop(0)
        key = arg[2:].partition("=")[0]
        if arg.startswith("--") and "=" not in arg and argv and not argv[0].startswith("--") and (
                key not in FLAGS or key == "estimate" and not os.path.isfile(argv[0])
                or key == "prepare" and argv[0].isdigit()):
            arg = f"{arg}={argv.pop(0)}"  # '--gpus 64' -> '--gpus=64'; a lone --key is never valid otherwise
        if arg.startswith("--") and key in opts:
            if "=" not in arg:  # a flag standing alone: --synthetic, --json (stdout), --profile, --estimate
                if key not in FLAGS:
                    raise UserError(f"bench option --{key} needs a value: --{key}=VALUE")
                opts[key] = True
                continue
            raw = arg.partition("=")[2]
            try:
                value = raw if key in STRINGS else ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            opts[key] = check_value(key, value, OPTIONS[key], RULES[key])
        else:
            rest.append(arg)
    if isinstance(opts["estimate"], str):  # --estimate llama-7b is --model=llama-7b --estimate, after its recipe
        rest[:0] = recipes().get(opts["estimate"], []) + [f"--model={opts['estimate']}"]
    return opts, rest


def recipes():
    """{preset: [config file]} for the presets that exactly one file in config/ names as its model."""
    named = {}
    for path in sorted(Path(__file__).resolve().parent.glob("config/*.py")):
        named.setdefault(parse_config([str(path)], train.DEFAULTS, train.RULES, "train.py")["model"], []).append(path)
    return {preset: [str(paths[0])] for preset, paths in named.items() if preset and len(paths) == 1}


# -----------------------------------------------------------------------------------------------
# memory estimate: arithmetic only, per GPU (per process), in bytes

def count_params(mcfg):
    """(all parameters, one block's, one decoder block's or 0, those of the nn.Linear layers outside the blocks: the
    heads, the only ones there that autocast casts), counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        m = M.from_config(mcfg)
    dec = sum(p.numel() for p in m.dec_blocks[0].parameters()) if mcfg.n_dec_layer else 0
    inner = {id(p) for block in blocks_of(m) for p in block.parameters()}
    heads = sum(p.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear)
                for p in mod.parameters() if id(p) not in inner)
    return m.num_params(), sum(p.numel() for p in m.blocks[0].parameters()), dec, heads


def estimate_memory(mcfg, batch_size, seq_len, world, parallel, dtype, activation_checkpointing, unsharded_grads=False):
    """Bytes per GPU (per process) for train.py's setup: fp32 master weights and gradients, AdamW's two
    fp32 states, activations at the per-GPU batch and sequence length, and other buffers; `total` is
    the estimated peak. activation_checkpointing: 'none'/'full' (or False/True)."""
    n, n_block, n_dec, n_heads = count_params(mcfg)
    n_rest = n - mcfg.n_layer * n_block - mcfg.n_dec_layer * n_dec  # embeddings, final norm, LM head (FSDP's root unit)
    e = (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize  # compute dtype bytes
    ckpt = activation_checkpointing in (True, "full")
    s, b, h, f, a, V = seq_len, batch_size, mcfg.n_embd, mcfg.ffn_hidden, mcfg.n_head, mcfg.vocab_size

    # Activations saved for backward, after Korthikanti et al. 2022 ("Reducing activation recomputation"),
    # who count sbh(34 + 5as/h) bytes per 16-bit GPT layer. Here dropout is 0 (no masks), and SDPA's
    # flash / memory-efficient kernels keep q, k, v, the output and an fp32 logsumexp (4as bytes) instead
    # of the s x s softmax, so the 5as/h term is gone. What this model keeps per layer, counted with
    # saved_tensors_hooks on torch 2.13, in units of s*b*h elements:
    amp = e < 4 and parallel != "fsdp"  # autocast; FSDP instead runs the whole model in its param dtype
    R = 4 if amp else e  # the residual stream: under autocast fp32 (fp32 embeddings, promoting adds)
    norm = R if mcfg.norm == "layernorm" else 8  # the input; RMSNorm keeps fp32 copies of x and x*rstd
    g = mcfg.n_kv_head / mcfg.n_head  # the width of k (and of v) relative to q: below 1 with GQA
    attn = ((2 if amp else 1)  # the normed input: autocast casts it once for q and once for kv
            + 2 + 2 * g          # q, the output, the kv projection that k and v are views of (SDPA
            # takes GQA's narrow k, v as they are, torch 2.5+: no repeated copies)
            + (g + 1 if mcfg.pos == "rope" else 0))  # RoPE'd k is a copy (v still holds the whole kv
            # projection), and RoPE'd q makes SDPA's output (B,H,T,D): proj copies it
    mlp = 1 + (4 if mcfg.mlp in M.GATED else 2) * f / h  # input; GELU in+out; SwiGLU up, silu(gate), product
    copies = e if amp else 0  # autocast's low-precision weight copies are saved for backward too
    layer = s * b * h * (2 * norm + e * (attn + mlp)) + 4 * a * s * b + copies * n_block
    # an encoder-decoder's decoder block: the same, plus a cross-attention costed like the self-attention (the
    # decoder taken as long as the encoder: an upper bound for T5's shorter targets)
    dec_layer = layer + s * b * h * (norm + e * attn) + 4 * a * s * b + copies * (n_dec - n_block) if n_dec else 0
    if mcfg.head == "lm" and M.LOSS_CHUNK_BYTES:
        # the head at the fused loss's peak, in its forward (model.LinearCrossEntropy): final norm, LM-head input,
        # the loss's gradients w.r.t. that input (compute dtype) and the weight (fp32), and one chunk of rows at
        # its widest: its logits' gradient and the product added into the weight's, both in the compute dtype,
        # or (a narrower compute dtype) its fp32 logits and their cast
        rows = min(s * b, max(1, M.LOSS_CHUNK_BYTES // (4 * V)))
        chunk = max(e * V * (rows + h), (4 + e) * rows * V if e < 4 else 0)
        head = s * b * h * (norm + R + e) + 4 * V * h + chunk
    else:  # the plain path: final norm, LM-head input, logits (kept by the caller), the fp32 log-softmax,
        # and at the start of backward the two dense fp32 (b, s, V) gradients of the loss
        head = s * b * h * (norm + e) + s * b * V * (e + 4 + 8)
    head += copies * n_heads  # the heads' weights, cast once (embeddings and norms are not cast)
    # full checkpointing keeps each block's fp32 input and recomputes one block at a time in backward. The head's
    # peak is in the forward pass, where autocast's cache still holds every block's weight copies; the recomputed
    # block is in backward: they do not meet
    n_blocks = mcfg.n_layer + mcfg.n_dec_layer
    cached = copies * (mcfg.n_layer * n_block + mcfg.n_dec_layer * n_dec)
    acts = (n_blocks * R * s * b * h + max(layer, dec_layer, head + cached) if ckpt
            else mcfg.n_layer * layer + mcfg.n_dec_layer * dec_layer + head)

    if parallel == "fsdp":  # gathered compute-dtype params of the root and two blocks (one prefetched),
        # plus the largest unit's unsharded gradient and its fp32 copy for reduce-scatter
        buffers = e * (n_rest + 2 * max(n_block, n_dec)) + (e + 4) * max(n_block, n_dec, n_rest)
    else:  # DDP: train.py uses gradient_as_bucket_view=True, so gradients live in the buckets, no second copy
        buffers = 0
    out = dict(n_params=n, **state_bytes(n, world, parallel, unsharded_grads), activations=acts, buffers=buffers)
    # gradients are allocated (zero_grad sets them to None) as the backward pass frees activations, so the
    # peak is at its start (all activations) or at the first block (nearly all gradients, one block's). DDP's
    # buckets, which the gradients are views of, stay allocated from one step to the next: resident
    resident = out["grads"] if parallel == "ddp" else 0
    out["total"] = (out["params"] + out["optimizer"] + buffers + resident
                    + max(acts, out["grads"] - resident + max(layer, dec_layer)))
    return out


def run_estimate(opts, cfg, emit):
    cfg = train.settle(cfg)[0]
    mcfg = train.model_config(cfg)  # the preset's own vocabulary unless --vocab_size
    world = opts["gpus"]
    parallel = cfg["parallel"] if cfg["parallel"] != "auto" else "ddp" if world > 1 else "single"
    dtype = "bfloat16" if cfg["dtype"] == "auto" else cfg["dtype"]  # what 'auto' picks on a recent GPU
    res = {ac: estimate_memory(mcfg, cfg["batch_size"], mcfg.block_size, world, parallel, dtype, ac,
                               unsharded_grads(cfg, parallel))
           for ac in ("none", "full")}
    gib = lambda x: f"{x / 2**30:10.2f}"
    recipe = " (" + ", ".join(recipes().get(cfg["model"], [])) + ")" if recipes().get(cfg["model"]) else ""
    emit(f"{cfg['model']}{recipe}: {res['none']['n_params']:,} parameters; {parallel} on {world} GPU(s), {dtype}, "
         f"batch_size={cfg['batch_size']} per GPU, block_size={mcfg.block_size}; GiB per GPU "
         f"(configured activation_checkpointing={cfg['activation_checkpointing']}):")
    emit(f"{'activation_checkpointing':26s}" + "".join(f"{k:>12s}" for k in res["none"] if k != "n_params"))
    for ac, r in res.items():
        emit(f"{ac:26s}" + "".join(f"  {gib(v)}" for k, v in r.items() if k != "n_params"))
    return dict(model=cfg["model"], model_config=asdict(mcfg), world=world, parallel=parallel, dtype=dtype,
                batch_size=cfg["batch_size"], seq_len=mcfg.block_size, configured=cfg["activation_checkpointing"],
                estimate=res)


# -----------------------------------------------------------------------------------------------
# benchmark

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def build_variant(cfg, opts):
    """Everything one configuration needs to take steps, built by train.py's own functions."""
    rt = train.setup(cfg)  # sets the CPU thread count
    settled = train.settle(cfg)[0]
    real = not opts["synthetic"] and os.path.exists(os.path.join(cfg["data_root"], settled["dataset"], "meta.json"))
    if real:
        run = train.resolve_run(cfg, rt)
    else:  # synthetic: the preset's vocabulary unless --vocab_size
        mcfg = train.model_config(settled)
        settled.update(seq_len=cfg["seq_len"] or mcfg.block_size, parallel=rt.parallel)
        run = train.Run(settled, data.OBJECTIVES[settled["objective"]], {}, (), None, None, mcfg, [], {})
    mcfg, T, B = run.mcfg, run.cfg["seq_len"], cfg["batch_size"]
    batches = []  # made once and reused: the timed loop holds no data loading
    for micro in range(cfg["gradient_accumulation_steps"]):
        if real:
            batches.append(train.get_batch(run, rt, 0, micro))
        else:  # random inputs and targets: the step costs the same as on text
            g = torch.Generator().manual_seed(cfg["seed"] + micro)
            x, y = torch.randint(mcfg.vocab_size, (2, B, T), generator=g).to(rt.device)
            batches.append({"idx": x, "targets": y})
    key = (str(rt.device), rt.dtype, torch.get_num_threads())  # measure a CPU peak once, so variants share it
    if key not in PEAKS:
        given = (opts["peak_tflops"] * 1e12, "--peak_tflops") if opts["peak_tflops"] else None
        PEAKS[key] = given or peak_flops(rt.device, rt.dtype)
    peak, peak_src = PEAKS[key]
    return dict(cfg=cfg, run=run, rt=rt, mcfg=mcfg, T=T, state=train.build(run.cfg, rt, mcfg), batches=batches,
                threads=torch.get_num_threads(), data=cfg["dataset"] if real else "synthetic",
                peak=peak, peak_src=peak_src, ms=[], mem=0, mem_reserved=0)


def take_step(v):
    """One optimizer step, train.py's own: accumulation, the step's collective, clipping, the update."""
    train.train_step(v["state"], v["batches"], v["run"], v["rt"], v["cfg"]["learning_rate"])


def timed_step(v):
    torch.set_num_threads(v["threads"])  # variants may differ in --threads
    device = v["rt"].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    take_step(v)
    sync(device)
    v["ms"].append((time.perf_counter() - t0) * 1000)
    if device.type == "cuda":
        v["mem"] = max(v["mem"], torch.cuda.max_memory_allocated(device))
        v["mem_reserved"] = max(v["mem_reserved"], torch.cuda.max_memory_reserved(device))


def report(v, opts, n_variants):
    """One variant's results: timings, throughput, MFU, memory (measured and estimated), and provenance."""
    cfg, mcfg, ms, T, rt = v["cfg"], v["mcfg"], sorted(v["ms"]), v["T"], v["rt"]
    tokens = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * rt.world * T
    q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    tok_s = tokens / (med / 1000)
    fpt = flops_per_token(mcfg, T, training=True)  # model FLOPs: checkpointing's recomputation not counted
    achieved = fpt * tok_s / 1e12
    if rt.device.type == "cuda":
        note = " (this variant's steps, all variants resident)" if n_variants > 1 else ""
        mem = dict(peak_bytes=v["mem"], reserved_bytes=v["mem_reserved"],
                   source="torch.cuda.max_memory_allocated" + note)
    else:  # ru_maxrss is KiB on Linux, bytes on macOS; it cannot be reset, so it covers the whole process
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        mem = dict(peak_bytes=rss, source="peak RSS of the whole process (getrusage ru_maxrss)")
    est = estimate_memory(mcfg, cfg["batch_size"], T, rt.world, rt.parallel, rt.dtype, cfg["activation_checkpointing"],
                          unsharded_grads(cfg, rt.parallel))
    return dict(model=v["run"].cfg["model"], n_params=v["state"].raw.num_params(), model_config=asdict(mcfg),
                data=v["data"],
                device=str(rt.device), dtype=str(rt.dtype).split(".")[-1], compile=rt.compile,
                activation_checkpointing=cfg["activation_checkpointing"], parallel=rt.parallel, world=rt.world,
                threads=v["threads"], batch_size=cfg["batch_size"], block_size=T,
                gradient_accumulation_steps=cfg["gradient_accumulation_steps"], steps=len(ms), warmup=opts["warmup"],
                tokens_per_step=tokens,
                ms_per_step=dict(median=med, min=ms[0], max=ms[-1], p25=q1, p75=q3, all=v["ms"]),
                tokens_per_s=tok_s, flops_per_token=fpt, achieved_tflops=achieved, peak_tflops=v["peak"] / 1e12,
                peak_source=v["peak_src"], mfu=mfu(fpt, tok_s, v["peak"], rt.world), memory=mem,
                estimated_total_bytes=est["total"], provenance=provenance(cfg, rt.device, rt.world))


def run_bench(opts, rest, emit):
    variants = []
    for item in (opts["compare"].split(",") if opts["compare"] else [""]):
        extra = [f"--{kv}" for kv in item.split("+") if kv]  # parsed and type-checked like any --key=value
        v = build_variant(train.get_config(rest + extra), opts)
        v["name"] = item or "run"
        variants.append(v)
    m0 = variants[0]
    rt = m0["rt"]
    emit(f"model {m0['run'].cfg['model']}: {m0['state'].raw.num_params():,} parameters, {m0['data']} data; "
         f"{rt.device}, parallel={rt.parallel} world={rt.world}; warmup {opts['warmup']}, steps {opts['steps']}")
    for v in variants:  # compilation, allocator and optimizer-state warm-up happen here
        for _ in range(opts["warmup"]):
            take_step(v)
        sync(v["rt"].device)
    for r in range(opts["steps"]):  # rotate the order each round so no variant always runs first
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            timed_step(v)
    results = [report(v, opts, len(variants)) for v in variants]
    for v, res in zip(variants, results):  # tokens/s over the first's, the median of per-round pairs:
        ratio = res["tokens_per_step"] / results[0]["tokens_per_step"]  # pairs cancel the machine's drift
        res["name"] = v["name"]
        res["speedup"] = statistics.median(ratio * a / b for a, b in zip(variants[0]["ms"], v["ms"]))
    emit(f"{'variant':28s} {'dtype':>8s} {'thr':>3s} {'ms/step med [min max]':>26s} {'tok/s':>9s} "
         f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>9s} {'speedup':>7s}")
    for res in results:
        ms = res["ms_per_step"]
        emit(f"{res['name'][:28]:28s} {res['dtype']:>8s} {res['threads']:3d} {ms['median']:9.1f} "
             f"[{ms['min']:7.1f} {ms['max']:7.1f}] "
             f"{res['tokens_per_s']:9,.0f} {res['achieved_tflops']:8.3f} {res['mfu']:6.1%} "
             f"{res['memory']['peak_bytes'] / 2**20:6.0f}MiB {res['speedup']:7.2f}x")
    r0 = results[0]
    emit(f"{r0['tokens_per_step']:,} tokens/step, {r0['flops_per_token'] / 1e6:,.1f} MFLOP/token (training); MFU vs "
         f"{r0['peak_tflops']:.3f} TFLOP/s ({r0['peak_source']}); memory: {r0['memory']['source']}; "
         f"estimate {r0['estimated_total_bytes'] / 2**20:,.0f} MiB")

    if opts["profile"]:
        path = "bench_trace.json" if opts["profile"] is True else opts["profile"]
        kinds = torch.profiler.ProfilerActivity
        acts = [kinds.CPU] + ([kinds.CUDA] if rt.device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for i in range(3):
                with torch.profiler.record_function(f"train_step {i}"):
                    take_step(m0)
            sync(rt.device)
        prof.export_chrome_trace(path)
        emit(f"profile of 3 steps of {m0['name']} written to {path} (open in https://ui.perfetto.dev)")
    return results[0] if len(results) == 1 else {"variants": results}


PREPARE_ROUNDS = 3


def run_prepare(mb, emit):
    """prepare.py's tokens/s with the gpt2 BPE, 1 and min(cpu count, 8) worker processes, against a plain loop of
    encode_ordinary over the same documents (read the same way, nothing written), on mb MB of .jsonl made
    of the stdlib's .py files repeated; the variants alternate their order each round."""
    try:
        tok = prepare.get_tokenizer("gpt2")
    except UserError as e:
        raise UserError(f"bench.py --prepare times the gpt2 BPE, which cannot be loaded: {str(e).split('. Fix')[0]}. "
                        f"Set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files, or run once online"
                        ) from None
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for _, f in prepare.pystdlib_files()]
    procs = min(os.cpu_count() or 1, 8)
    with tempfile.TemporaryDirectory() as tmp:
        path, size = os.path.join(tmp, "docs.jsonl"), 0
        with open(path, "w") as f:
            while size < mb * 1e6:
                line = json.dumps({"text": texts[size % len(texts)]}) + "\n"  # ASCII: bytes == characters
                size += f.write(line)

        def run(workers):  # the whole command, as a user runs it (its workers do not import this file's torch)
            subprocess.run([sys.executable, prepare.__file__, "--name=bench", f"--input={path}", "--tokenizer=gpt2",
                            f"--out_dir={tmp}", f"--workers={workers}", "--quiet"], check=True)
            meta = json.loads(Path(tmp, "bench", "meta.json").read_text())
            return meta["train_tokens"] + meta["val_tokens"]

        loop = lambda: sum(len(tok.encode(t)) + 1 for t, _ in readers.iter_documents([path]))
        variants = {"encode_ordinary loop": loop,
                    "prepare.py, 1 process": lambda: run(1), f"prepare.py, {procs} processes": lambda: run(procs)}
        names, seconds, tokens = list(variants), {v: [] for v in variants}, set()
        emit(f"{size / 1e6:.0f} MB of text, gpt2 BPE, {PREPARE_ROUNDS} rounds of {', '.join(names)}")
        for r in range(PREPARE_ROUNDS):
            for name in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter()
                tokens.add(variants[name]())
                seconds[name].append(time.perf_counter() - t0)
    assert len(tokens) == 1, tokens  # every variant tokenized the same documents to the same count
    n, base = tokens.pop(), seconds[names[0]]
    res = {name: dict(seconds=s, tokens_per_s=n / statistics.median(s),
                      speedup=statistics.median(b / a for a, b in zip(s, base)))
           for name, s in seconds.items()}
    for name, r in res.items():
        s = sorted(r["seconds"])
        emit(f"{name:24s} {statistics.median(s):7.1f} s [{s[0]:.1f} {s[-1]:.1f}] {r['tokens_per_s']:12,.0f} tokens/s "
             f"{r['speedup']:5.2f}x")
    return dict(mb=size / 1e6, tokens=n, variants=res)


def main(argv):
    if {"-h", "--help"} & set(argv):  # bench's own options, then train.py's keys
        return print(__doc__.strip() + "\n\n" + usage("train.py's", train.DEFAULTS, train.RULES, train.__file__))
    opts, rest = parse_args(argv)
    # with a bare --json, stdout carries nothing but the JSON: the log, and any print from train.py, go to stderr
    to_stdout, out = opts["json"] is True, sys.stdout
    quiet = int(os.environ.get("RANK", 0)) != 0  # under torchrun only rank 0 reports
    emit = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr)) if to_stdout else print
    with redirect_stdout(sys.stderr) if to_stdout else nullcontext():
        if opts["prepare"]:
            if rest:
                raise UserError(f"bench.py --prepare takes no other arguments, got {' '.join(rest)}")
            result = run_prepare(300 if opts["prepare"] is True else opts["prepare"], emit)
        elif opts["estimate"]:
            result = run_estimate(opts, train.get_config(rest), emit)
        else:
            result = run_bench(opts, rest, emit)
    if opts["json"] and not quiet:
        with nullcontext(out) if to_stdout else open(opts["json"], "w") as f:
            print(json.dumps(result, indent=1), file=f)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        destroy_distributed()
