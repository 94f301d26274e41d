"""
Where a run's process runs and how the model is spread over it. setup() resolves the device, dtype, parallel
mode and compile from the config and torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) into a Runtime, and
joins the process group. build_model() builds the model on the meta device, parallelised from outside, then
materialised: the one place that applies activation checkpointing, torch.compile, FSDP2 and DDP, per block where
it matters; model.py knows nothing of them. train.py and bench.py both go through here.
"""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import model as M
from common import UserError, init_distributed, resolve_device, resolve_dtype

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
    device = torch.device(resolve_device(cfg["device"], cuda, cuda and torch.cuda.device_count(),
                                         torch.backends.mps.is_available(), int(env.get("LOCAL_WORLD_SIZE", 1)),
                                         local_rank))
    parallel = cfg["parallel"]
    if parallel == "auto":
        parallel = "ddp" if "RANK" in env else "single"
    if parallel != "single" and "RANK" not in env:
        raise UserError(f"parallel={parallel!r} needs torchrun (torchrun --nproc_per_node=N train.py ...); for one "
                        f"process give --parallel=single")
    gpu = device.type == "cuda"
    dtype = getattr(torch, resolve_dtype(cfg["dtype"], device.type, parallel, gpu and torch.cuda.is_bf16_supported(),
                                         gpu and torch.cuda.get_device_name(device)))
    dynamo = torch._dynamo.is_dynamo_supported() and device.type in ("cpu", "cuda")
    compile = gpu and dynamo if cfg["compile"] is None else cfg["compile"]
    if compile and not dynamo:
        raise UserError(f"compile=True is not supported here (Python {sys.version.split()[0]}, device "
                        f"{device.type}); use --compile=False")
    if gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32: TF32 (the MFU peak's)
    else:
        torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 1) // int(env.get("LOCAL_WORLD_SIZE", 1))))
    init_distributed("nccl" if gpu else "gloo", cfg["dist_timeout_minutes"], device if gpu else None)
    return Runtime(device, dtype, rank, world, parallel, compile)


# -----------------------------------------------------------------------------------------------
# the model, built and parallelised


def build_model(cfg, mcfg, rt):
    """The Transformer, parallelised and initialised. Under FSDP it is sharded while still on the meta
    device, so a rank only ever allocates its own shards; DDP wraps real weights (it broadcasts them)."""
    with torch.device("meta"):
        net = M.from_config(mcfg)
    if rt.parallel == "fsdp":
        net = parallelize(net, cfg, rt)
    net.to_empty(device=rt.device)
    init_params(net, cfg["seed"], rt.device)
    return net if rt.parallel == "fsdp" else parallelize(net, cfg, rt)


def parallelize(model, cfg, rt):
    """Activation checkpointing, compile, FSDP2 and DDP, in that order: the one place that applies them.
    The model itself knows nothing of them, and its parameter names stay unchanged (no _orig_mod.)."""
    for block in blocks_of(model):
        if cfg["activation_checkpointing"] == "full":
            checkpointed(block)
        if rt.compile and rt.parallel == "fsdp":  # per block, so FSDP can overlap communication
            block.compile()
    if rt.compile and rt.parallel != "fsdp":
        model.compile()  # in place
    if rt.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch 2.6 keeps FSDP2 under _composable
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(rt.device.type, (rt.world,))
        mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
        inner = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in blocks_of(model):  # blocks get the root's low-precision activations; RoPE's tables stay fp32
            fully_shard(block, mesh=mesh, mp_policy=inner)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    if rt.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model


def blocks_of(model):
    """Every Transformer block, of every stack (an encoder-decoder's encoder, then its decoder): the
    units of activation checkpointing, per-block compile and FSDP sharding."""
    return [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def checkpointed(block):
    """Activation checkpointing by wrapping forward in place: parameter names stay unchanged."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward
    block.forward = lambda *args, **kw: checkpoint(inner, *args, use_reentrant=False, **kw)


@torch.no_grad()
def init_params(model, seed, device):
    """Every parameter (or its local shard) gets exactly the value a single-process init gives."""
    for name, p in model.named_parameters():
        full = model.init_tensor(name, p.shape, seed, device)
        if hasattr(p, "to_local"):  # an FSDP2 DTensor sharded on dim 0: copy this rank's chunk
            local = p.to_local()
            if local.numel():
                local.copy_(dim0_shard(full, p.device_mesh.get_local_rank(), p.device_mesh.size()))
        else:
            p.copy_(full)
    model.init_buffers()


def dim0_shard(full, rank, world):
    """This rank's part of a tensor as fully_shard splits it: torch.chunk on dim 0; a rank past the last
    chunk (more ranks than rows) holds nothing."""
    chunks = full.chunk(world, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


@torch.no_grad()
def load_shards(model, chunks):
    """FSDP: copy each parameter's local chunk (dim0_shard) from `chunks`,
    a state dict of this rank's chunks only (hf.load_checkpoint with shard=(rank, world))."""
    for name, p in model.named_parameters():
        local = p.to_local()
        if local.numel():
            local.copy_(chunks[name])
