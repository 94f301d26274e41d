"""
Small helpers that several scripts share, each with one home here: atomic file writes, reading JSONL,
a run's provenance, the config parser, signal handling, and the distributed helpers (a thin layer over
torch.distributed: torchrun starts
the processes, we write no collective of our own). Only the standard library is imported at the top,
so prepare.py never loads torch; optional packages are imported by need(), where they are used.
"""
import ast
import difflib
import importlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import threading
import time
import typing
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace


def atomic_write(path, data):
    """Write `data` (bytes, str, or a function that writes to a binary file) to `path` under a temporary
    name, fsync it, then rename: a crash or a full disk leaves the old file whole, never a half new one."""
    path = str(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def need(module, pip, what="this"):
    """An optional package, imported; when it is missing, a UserError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the optional package {pip}: pip install {pip}") from None


def read_jsonl(path, stream=None):
    """Yield (line number, record, bytes of the line) for each non-blank line of a .jsonl file (or of
    `stream`, an open binary file such as a decompressing one, named by path); a line that is not JSON
    raises a UserError naming the file and line."""
    with open(path, "rb") if stream is None else nullcontext(stream) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{lineno}: not a line of JSON") from None
            yield lineno, rec, len(line)


def mix_seed(seed: int, n: int) -> int:
    """One generator seed from the run's seed and a number (a step, a parameter name's hash): the formula behind
    initialisation, data order and dropout, so each is a pure function of the seed."""
    return seed * 1_000_003 + n


def git_commit():
    """The commit of the checkout this file is in (with '+dirty' for uncommitted changes), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)
        sha = run("rev-parse", "HEAD")
        if sha.returncode:
            return None
        return sha.stdout.strip() + ("+dirty" if run("status", "--porcelain", "-uno").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(config, device, world):
    """Where a run's numbers come from: torch version, device name, world size, git commit and config."""
    import torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.machine()})"
    return dict(torch=str(torch.__version__), device_name=name, world=world, git=git_commit(), config=config)


# -----------------------------------------------------------------------------------------------
# device and dtype: pure functions of what was asked for and what the machine has, so CPU tests cover them

def resolve_device(requested, cuda=False, n_cuda=0, mps=False, local_world=1, local_rank=0):
    """The device string for `requested` ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'). A CUDA device always
    carries an index: torch.cuda.set_device and NCCL need one. Under torchrun each local rank takes
    cuda:LOCAL_RANK; naming one GPU then would put every rank on it."""
    dev = requested
    if dev == "auto":
        dev = "cuda" if cuda else "mps" if mps else "cpu"
    kind, _, index = dev.partition(":")
    if kind == "cuda":
        if not cuda or n_cuda < 1:
            raise UserError(f"device={requested!r} but no CUDA device is available; use --device=cpu")
        if index and local_world > 1:
            raise UserError(f"device={requested!r} names one GPU for all {local_world} local ranks; use "
                             f"--device=cuda (each rank takes cuda:LOCAL_RANK)")
        if not index.isdigit() and index:
            raise UserError(f"device={requested!r} is not a device; use cuda or cuda:N")
        i = int(index) if index else local_rank
        if i >= n_cuda:
            raise UserError(f"device={requested!r} needs GPU {i}, but there are {n_cuda}; "
                            f"use cuda:0..cuda:{n_cuda - 1}")
        return f"cuda:{i}"
    if kind == "mps" and not mps:
        raise UserError(f"device={requested!r} but MPS is not available; use --device=cpu")
    if kind not in ("cpu", "mps") or index:
        raise UserError(f"device={requested!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    return kind


def resolve_dtype(requested, device_type, parallel, bf16=False, device_name=""):
    """The compute dtype's name: 'auto' is bfloat16 on a GPU that has it, else float16 on CUDA, float32 elsewhere."""
    dt = requested
    if dt == "auto":  # (FSDP has no loss scaler for fp16: a GPU without bf16 runs it in fp32)
        dt = ("bfloat16" if bf16 else "float16" if parallel != "fsdp" else "float32") if device_type == "cuda" \
            else "float32"
    if dt not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={dt!r} is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    if dt == "float16" and parallel == "fsdp":
        raise UserError("dtype='float16' with FSDP is not supported (its loss scaler is not wired in); use bfloat16")
    if dt == "float16" and device_type == "cpu":
        raise UserError("dtype='float16' needs a GPU (fp16 on CPU is slow and unsupported by the loss scaler); "
                         "use --dtype=float32 (or bfloat16)")
    if dt == "bfloat16" and device_type == "cuda" and not bf16:
        raise UserError(f"dtype='bfloat16' is not supported by {device_name}; use float16")
    return dt


# -----------------------------------------------------------------------------------------------
# MFU: the model's FLOPs per token (one implementation, for train.py's log and bench.py), the hardware's peaks

def flops_per_token(cfg, seq_len: int | None = None, training: bool = True, dec_len: int | None = None) -> float:
    """Matmul FLOPs per token (2 per multiply-add), attention scores included: every Linear in the
    blocks and the heads, plus Q@K^T and P@V over the full seq_len window (as the dense kernels
    compute them). Training counts forward + backward = 3x forward. Embedding lookups are free.
    An encoder-decoder's token is any of a pair's seq_len source and dec_len (default seq_len) target
    tokens: the pair's FLOPs divided by seq_len + dec_len."""
    from model import GATED, mlm_slots
    T = seq_len or cfg.block_size
    C, D, L = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.n_layer
    kv_linear = C * 2 * cfg.n_kv_head * D
    attn_linear = C * cfg.n_head * D + kv_linear + C * C
    mlp_linear = C * cfg.ffn_hidden * (3 if cfg.mlp in GATED else 2)
    attn_scores = 2 * cfg.n_head * D * T  # (q . k) and (p . v) per query position
    # the MLM head (transform + decoder) runs at mlm_slots(T) positions of each row's T; pooler, NSP and
    # classifier once per row
    head = {"lm": C * cfg.vocab_size,
            "mlm_nsp": (mlm_slots(T) * (C * C + C * cfg.vocab_size) + C * C + C * 2) / T,
            "classify": (C * C + C * cfg.n_labels) / T}[cfg.head]
    fwd = 2 * (L * (attn_linear + mlp_linear + attn_scores) + head)
    if cfg.n_dec_layer:  # per target token: self- and cross-attention (over the T source tokens), MLP, head; the
        # cross-attention's keys and values are per source token
        Td, Ld = dec_len or T, cfg.n_dec_layer
        dec = Ld * (2 * attn_linear - kv_linear + mlp_linear + 2 * cfg.n_head * D * (Td + T)) + head
        fwd = 2 * (T * (L * (attn_linear + mlp_linear + attn_scores) + Ld * kv_linear) + Td * dec) / (T + Td)
    return 3 * fwd if training else fwd


# Dense peak FLOP/s (without sparsity) from the vendors' datasheets and whitepapers, keyed by words of the device
# name as the driver reports it (torch.cuda.get_device_name). bf16: the bf16 and fp16 tensor-core peak (GeForce:
# with fp32 accumulation, as PyTorch runs it); fp16 only where there is no bf16. tf32: fp32 matmuls with TF32 on;
# fp32 only where there is no TF32.
PEAK_FLOPS = {
    # Blackwell
    "GB200": dict(bf16=2.5e15, tf32=1.25e15), "B200": dict(bf16=2.25e15, tf32=1.125e15),
    # Hopper. "NVIDIA H100 80GB HBM3" is the SXM part; H200, GH200 and the H800 have its compute
    "H100": dict(bf16=989.4e12, tf32=494.7e12), "H100 PCIe": dict(bf16=756e12, tf32=378e12),
    "H100 NVL": dict(bf16=835.5e12, tf32=417.5e12), "H200": dict(bf16=989.4e12, tf32=494.7e12),
    "H200 NVL": dict(bf16=835.5e12, tf32=417.5e12), "GH200": dict(bf16=989.4e12, tf32=494.7e12),
    "H800": dict(bf16=989.4e12, tf32=494.7e12), "H800 PCIe": dict(bf16=756e12, tf32=378e12),
    "H20": dict(bf16=148e12, tf32=74e12),
    # Ampere. The A10G (AWS) has no datasheet of its own: the A10's figures
    "A100": dict(bf16=312e12, tf32=156e12), "A800": dict(bf16=312e12, tf32=156e12),
    "A40": dict(bf16=149.7e12, tf32=74.8e12), "A30": dict(bf16=165e12, tf32=82e12),
    "A10": dict(bf16=125e12, tf32=62.5e12), "A10G": dict(bf16=125e12, tf32=62.5e12),
    "RTX A6000": dict(bf16=154.8e12, tf32=77.4e12), "RTX 3090": dict(bf16=71e12, tf32=35.6e12),
    # Ada
    "L4": dict(bf16=121e12, tf32=60e12), "L40": dict(bf16=181e12, tf32=90.5e12),
    "L40S": dict(bf16=362e12, tf32=183e12), "RTX 6000 Ada": dict(bf16=364.2e12, tf32=182.1e12),
    "RTX 4090": dict(bf16=165.2e12, tf32=82.6e12),
    # Volta and Turing: fp16 tensor cores, no bf16, no TF32
    "V100": dict(fp16=125e12, fp32=15.7e12), "V100 PCIe": dict(fp16=112e12, fp32=14e12),
    "V100S": dict(fp16=130e12, fp32=16.4e12), "T4": dict(fp16=65e12, fp32=8.1e12),
    # AMD Instinct: fp32 matrix peaks, as PyTorch on ROCm does not run fp32 matmuls as TF32 by default
    "MI300X": dict(bf16=1307.4e12, fp32=163.4e12), "MI325X": dict(bf16=1307.4e12, fp32=163.4e12),
    "MI250X": dict(bf16=383e12, fp32=95.7e12),
}


def peak_by_name(name: str, kind: str) -> tuple[float, str] | None:
    """(peak FLOP/s, source) of the PEAK_FLOPS entry for a device name, kind "bf16", "fp16" or "fp32" (TF32
    where the device has it); None if there is none. Keys match whole words, the longest key first, so "H100
    PCIe" wins over "H100" and "L4" never matches "L40S". fp16 is the bf16 peak where a device has both."""
    have = f" {re.sub(r'[^a-z0-9]+', ' ', name.lower())} "  # "A100-PCIE-40GB" -> " a100 pcie 40gb "
    if " mig " in have:  # a MIG slice has a share of the chip: measure it
        return None
    key = next((k for k in sorted(PEAK_FLOPS, key=len, reverse=True) if f" {k.lower()} " in have), None)
    peaks = PEAK_FLOPS.get(key, {})
    for k in {"bf16": ("bf16",), "fp16": ("fp16", "bf16"), "fp32": ("tf32", "fp32")}[kind]:
        if k in peaks:
            return peaks[k], f"{key} {k if kind == 'fp32' else kind} dense spec"
    return None


def peak_flops(device, dtype, measure: bool = True) -> tuple[float | None, str]:
    """Peak FLOP/s for MFU: the PEAK_FLOPS spec of a known CUDA device, else (CPU, an unknown GPU) measured
    with a large matmul in `dtype`. float32 on CUDA gets the TF32 peak: this assumes TF32 matmuls are on
    (torch.backends.cuda.matmul.allow_tf32), as train.py sets them. Returns (flops, source) for the log."""
    import torch
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if torch.device(device).type == "cuda":
        found = peak_by_name(torch.cuda.get_device_name(device), kind)
        if found:
            return found
    if not measure:
        return None, "unknown"
    return cached_matmul_flops(device, dtype), f"measured {kind} matmul"


def cached_matmul_flops(device, dtype):
    """measure_matmul_flops once per machine, device, torch version, dtype and thread count (it costs seconds on a
    CPU, at every launch otherwise), kept in $XDG_CACHE_HOME/anvil/peak_flops.json (default ~/.cache). A cache that
    cannot be read or written is ignored: the run measures, as before."""
    import torch
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    key = (f"{platform.node()} | {device} {name} | torch {torch.__version__} | {dtype} | "
           f"{torch.get_num_threads()} threads")
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "anvil", "peak_flops.json")
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):  # none yet, or corrupt
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    if isinstance(cache.get(key), float):
        return cache[key]
    flops = measure_matmul_flops(device, dtype)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, json.dumps({**cache, key: flops}, indent=1))
    except OSError:
        pass
    return flops


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def measure_matmul_flops(device, dtype, n=None, reps=5):
    """FLOP/s of the fastest of reps n x n matmuls (a busy machine only slows some). CUDA runs asynchronously:
    events on its stream time the kernel alone; the CPU runs it in the call, so a wall clock does."""
    import torch
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)  # large enough to keep a big GPU busy
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):  # the first one also pays for cuBLAS's setup and allocation
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            a @ b
            end.record(torch.cuda.current_stream(device))
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)  # elapsed_time is in ms
        else:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, world: int = 1) -> float:
    """Model FLOPs utilisation: the model's FLOP/s over the peak of `world` devices. At most 1.0: a measured
    peak (one matmul) can be beaten by the model's own kernels, and that says nothing about the model."""
    return min(1.0, flops_per_token * tokens_per_s / (peak * world))


def state_bytes(n_params, world, parallel, unsharded_grads=False):
    """Bytes per rank of what every parameter costs: fp32 weights and gradients, AdamW's two fp32 moments;
    sharded over the ranks under FSDP, plus a full fp32 copy of the gradients when FSDP accumulates them
    unsharded (fsdp_grad_sync='step'). Activations come on top (bench.py --estimate)."""
    n = n_params / (world if parallel == "fsdp" else 1)
    return dict(params=4 * n, grads=4 * n + 4 * n_params * unsharded_grads, optimizer=8 * n)


def unsharded_grads(cfg, parallel):
    """Whether FSDP keeps full unsharded gradients between micro-steps (fsdp_grad_sync='step', accumulation)."""
    return parallel == "fsdp" and cfg["fsdp_grad_sync"] == "step" and cfg["gradient_accumulation_steps"] > 1


# -----------------------------------------------------------------------------------------------
# distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; outside it these are no-ops

def dist_on():
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def barrier():
    if dist_on():
        import torch.distributed as dist
        dist.barrier()


def all_reduce_sum(t):
    """Sum a tensor over the ranks in place (and return it); unchanged in a single process."""
    if dist_on():
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def to_host(t):
    """Every device-to-host read of the training loop goes through here (a host sync on a GPU): one per step."""
    return t.tolist()


def to_host_later(t):
    """Start copying t to the host and return the function that finishes the read (to_host). On CUDA the copy goes
    to pinned memory behind the kernels queued so far, so the host then waits for those alone, while kernels queued
    after this call (the optimizer's) run; elsewhere the function simply reads."""
    import torch
    if t.device.type != "cuda":
        return lambda: to_host(t)
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: done.synchronize() or to_host(buf)


def init_distributed(backend, timeout_minutes, device=None):
    """Under torchrun, join the process group (even at world size 1: DDP needs one) unless already in it.
    A collective that waits longer than the timeout (a dead rank) fails instead of hanging. device: this rank's
    GPU, so the group (its barrier included) knows it from the start."""
    if "RANK" in os.environ and not dist_on():
        from datetime import timedelta
        import torch.distributed as dist
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device is not None else {}))


def destroy_distributed():
    """Leave the process group, if any: call it in a `finally`, so a failed run does not hang the others."""
    if dist_on():
        import torch.distributed as dist
        dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------
# configuration: defaults, then config files (plain Python assignments), then --key=value overrides

class UserError(ValueError):
    """A problem with what the user asked for (a value, a file, a corpus): the scripts report it as one line,
    without a traceback, before any work. Anything else is a bug and keeps its traceback."""


def rule(allowed, ok, bad=()):
    """A constraint on a config value, declared beside its default as Annotated[type, rule]:
    `allowed` says it in words, ok(value) checks it, `bad` holds values that break it (for the tests)."""
    return SimpleNamespace(allowed=allowed, ok=ok, bad=list(bad))


def at_least(lo):
    return rule(f">= {lo}", lambda v: v >= lo, [lo - 1])


def below(lo, hi):
    return rule(f"in [{lo}, {hi})", lambda v: lo <= v < hi, [lo - 0.5, hi])


fraction = rule("in [0, 1]", lambda v: 0 <= v <= 1, [-0.5, 1.5])


def one_of(*choices):
    """One of the choices; given a dict (a table such as data.OBJECTIVES), one of its keys at check time, so an
    entry added to the table is a valid choice."""
    table = choices[0] if len(choices) == 1 and isinstance(choices[0], dict) else choices
    return rule(" | ".join(map(repr, table)), lambda v: v in table, ["nope"])


nonempty = rule("non-empty", lambda v: v.strip() != "", [""])
device_rule = rule("'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v),
                   ["gpu"])


def usage(doc, defaults, rules, path):
    """--help: the script's docstring, then every key with its default, what it allows and the comment beside
    it in the script at `path`."""
    notes, lines = comments(path), []
    for k, v in defaults.items():
        kind, r = constraint(rules[k])
        lines.append(f"  --{k}={v!r}  ({kind.__name__}{' ' + r.allowed if r else ''})" + (f"  {notes[k]}" if k in notes
                                                                                         else ""))
    return doc.strip() + "\n\nkeys (--key=value; a config file may set them too):\n" + "\n".join(lines)


def comments(path):
    """{name: the comment beside its top-level assignment in the file, with the comment lines that continue it (a
    '#' then two or more spaces, right below)}."""
    import tokenize
    out, key, last = {}, None, -1
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            row = tok.start[0]
            if tok.type == tokenize.NAME and tok.start[1] == 0:
                key, last = tok.string, row
            elif tok.type == tokenize.COMMENT and key and row == last:
                out[key] = tok.string.lstrip("#").strip()
            elif tok.type == tokenize.COMMENT and key in out and row == last + 1 and tok.string.startswith("#  "):
                out[key], last = out[key] + " " + tok.string.lstrip("#").strip(), row
    return out


def constraint(annotation):
    """(type, rule or None) from a key's annotation: a plain type (bool) or Annotated[type, rule]."""
    args = typing.get_args(annotation)
    return (args[0], args[1]) if args else (annotation, None)


def parse_config(argv, defaults, rules, where):
    """`defaults` updated by config files (in order) and --key=value overrides (ast.literal_eval; a bare
    word is a string), each value checked against its key's annotation in `rules` (see rule()): its type (an
    int may stand for a float; None only where the default is None), then what is allowed. Raises a UserError naming the
    key, the value, what is allowed and the fix. `where` names the defaults."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            scope = {}
            try:  # a config file is trusted Python, like the script itself
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), {}, scope)
            except Exception as e:
                raise UserError(f"config file {arg!r} failed: {type(e).__name__}: {e}") from None
            items = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
                     and type(v).__name__ != "module"}
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise UserError(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --dataset=shakespeare
            if key in rules and constraint(rules[key])[0] is str and not isinstance(value, str) and value is not None:
                value = raw  # text keys take the text as written: --start=123
            items = {key: value}
        for key, value in items.items():
            if key not in defaults:
                close = difflib.get_close_matches(key, defaults, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else f"; see the defaults in {where}"
                raise UserError(f"unknown config key {key!r}{hint}")
            cfg[key] = check_value(key, value, defaults[key], rules[key])
    return cfg


def check_value(key, value, default, annotation):
    """`value` if it has the type and obeys the rule of `annotation` (an int for a float becomes a float)."""
    kind, r = constraint(annotation)
    if value is None and default is None:
        return value
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or r and not r.ok(value):
        allowed = f"{kind.__name__}{' ' + r.allowed if r else ''}{' or None' if default is None else ''}"
        raise UserError(f"config key {key}={value!r} is not allowed: {key} must be {allowed}; "
                        f"fix it with --{key}=... (default {default!r})")
    return value


@contextmanager
def dir_lock(folder):
    """Hold folder/lock (naming this host and pid) for the body, so only one run at a time writes to the
    folder: another is refused with a UserError; a lock whose process is gone (this host, pid dead) is taken over."""
    os.makedirs(folder, exist_ok=True)
    path, me = os.path.join(folder, "lock"), f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, me.encode())
            os.close(fd)
            break
        except FileExistsError:
            host, _, pid = open(path).read().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                os.remove(path)  # stale: its run was killed
                continue
            raise UserError(f"{folder} is in use by the run with pid {pid or '?'} on {host or '?'} (lock file {path}); "
                            f"stop that run or use another out_dir (delete the lock file only if that run is gone)"
                            ) from None
    try:
        yield
    finally:
        if os.path.exists(path) and open(path).read() == me:
            os.remove(path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


@contextmanager
def catch_signals(stop):
    """SIGTERM / SIGINT (preemption, Ctrl-C) append to the list `stop` instead of ending the process, so a
    loop can finish its step, checkpoint and exit; the previous handlers are back however the body ends."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
           for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
