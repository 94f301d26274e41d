"""
Checkpoints: written whole under a temporary name and then renamed, so a crash or a full disk never
leaves a half checkpoint or destroys the previous one; read with weights_only=True, so a file crafted
to run code on load is refused.

out_dir/ckpt-STEP.pt   single process and DDP: one file from rank 0 with the full state dicts
out_dir/ckpt-STEP.dcp  FSDP: a torch.distributed.checkpoint folder written by every rank, plus extra.pt
out_dir/best.pt|.dcp   the best validation loss so far
Both kinds hold model and optimizer state keyed by parameter name (torch.distributed.checkpoint's
state_dict API), so either loads into a plain, DDP or FSDP model at any world size.
"""
import os
import shutil

import torch

from common import UserError, atomic_write, barrier


def save_file(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def list_checkpoints(out_dir):
    """The complete ckpt-STEP.pt / ckpt-STEP.dcp names in out_dir, oldest step first."""
    names = [n for n in os.listdir(out_dir) if n.startswith("ckpt-") and n.endswith((".pt", ".dcp"))] \
        if os.path.isdir(out_dir) else []
    return sorted(names, key=lambda n: int(n[5:].split(".")[0]))


def find_checkpoint(path):
    """`path` itself if it is a checkpoint (a .pt file or a sharded .dcp folder), else the newest complete
    ckpt-STEP in the run folder `path`; None if there is none."""
    path = str(path)
    if os.path.isfile(path) or path.rstrip("/").endswith(".dcp") and os.path.isdir(path):
        return path
    names = list_checkpoints(path)
    return os.path.join(path, names[-1]) if names else None


def load_checkpoint(path):
    """A .pt checkpoint as a dict, or for a sharded .dcp folder its small metadata plus {"dcp": path}
    (the sharded tensors are loaded straight into the model and optimizer by restore())."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} not found")
    file = os.path.join(path, "extra.pt") if os.path.isdir(path) else path
    try:  # weights_only: a checkpoint is data; a file crafted to run code on load is refused. mmap: tensors are
        # read from the page cache as used, so the ranks of a node share one copy and each touches only its shards
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                         f"it is corrupted, truncated or not an anvil checkpoint") from e
    return dict(ckpt, dcp=path) if os.path.isdir(path) else ckpt


def check_weights(model, state):
    """Name the first mismatch between a state dict and the model (a different architecture)."""
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise UserError(f"checkpoint has parameter {k!r} that this model lacks: a different architecture")
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"checkpoint parameter {k!r} has shape {tuple(v.shape)}, this model "
                             f"{tuple(own[k].shape)}: a different architecture (check the model settings)")
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(f"checkpoint lacks parameter {missing[0]!r} ({len(missing)} missing): a different architecture")


def restore(ckpt, model, optimizers=()):
    """Load weights (and the optimizers' state) from either checkpoint kind into a plain, DDP-free or FSDP
    model: torch.distributed.checkpoint reshards, so the world size may differ from the saving run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    opts = list(optimizers)
    if "dcp" in ckpt:
        import torch.distributed.checkpoint as dcp
        msd, osd = get_state_dict(model, opts)
        state = {"model": msd, **({"optimizer": osd} if opts else {})}
        dcp.load(state, checkpoint_id=ckpt["dcp"])
        set_state_dict(model, opts, model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))
    else:
        check_weights(model, ckpt["model"])
        set_state_dict(model, opts, model_state_dict=ckpt["model"],
                       optim_state_dict=ckpt["optimizer"] if opts else {},
                       options=StateDictOptions(full_state_dict=True))


def save_checkpoint(base, model, optimizers, extra, parallel, master):
    """base.pt from rank 0 (single, DDP), or the sharded base.dcp folder written by all ranks (FSDP); the
    optimizers' states (AdamW, Muon) are one state dict keyed by parameter name.
    Either is complete before it takes its name, so a crash mid-save loses nothing."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizers)
    if parallel != "fsdp":
        if master:
            save_file({"model": msd, "optimizer": osd, **extra}, base + ".pt")
        return barrier()
    import torch.distributed.checkpoint as dcp
    final, tmp = base + ".dcp", base + ".dcp.tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
    if master:
        save_file(extra, os.path.join(tmp, "extra.pt"))
        if os.path.exists(final):  # best.dcp: the old one steps aside only once the new one is whole
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    barrier()


def prune_checkpoints(out_dir, keep):
    """Delete all but the newest `keep` ckpt-STEP checkpoints, and leftovers of interrupted saves."""
    stale = list_checkpoints(out_dir)[:-keep] + [n for n in os.listdir(out_dir) if ".tmp" in n]
    for n in stale:
        p = os.path.join(out_dir, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
