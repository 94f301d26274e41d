"""
The optimizers and the learning-rate schedule of a run: AdamW, or Muon (torch.optim.Muon, torch 2.9+) for the 2-D
weights inside the blocks with AdamW for the rest; linear warmup, then a schedule from SCHEDULES. Each update is
skipped on the device when the step's loss or gradients are not finite (no host read decides it), so the host
never waits inside a step. A new schedule is one function and one SCHEDULES entry; train.py's lr_schedule key
takes its choices from there.
"""
import math

import torch


def cosine(step, warmup, end, peak, low, cfg):
    """From peak at the end of warmup to low at `end`, on a cosine."""
    return low + 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, end - warmup))) * (peak - low)


def wsd(step, warmup, end, peak, low, cfg):
    """Warmup-stable-decay: peak until the last decay_frac of the steps, then linear to low at `end`."""
    start = max(warmup, end - round(cfg["decay_frac"] * end))
    return peak if step < start else low + (peak - low) * (end - step) / (end - start)


SCHEDULES = {"cosine": cosine, "wsd": wsd}  # the rate at a step after warmup and before `end`


def warmup_of(cfg):
    """warmup_iters, or when unset 100, or a tenth of the decay when that is shorter."""
    return cfg["warmup_iters"] if cfg["warmup_iters"] is not None else min(100, decay_end(cfg) // 10)


def decay_end(cfg):
    return cfg["lr_decay_iters"] or cfg["max_iters"]


def get_lr(cfg, step):
    """AdamW's learning rate at `step`: linear warmup to learning_rate, then the schedule, min_lr from lr_decay_iters
    (default max_iters) on. A function of the config and the step alone: a run resumed with a larger max_iters
    moves its decay to the new end."""
    warmup, end, peak, low = warmup_of(cfg), decay_end(cfg), cfg["learning_rate"], cfg["min_lr"]
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= end:
        return low
    return SCHEDULES[cfg["lr_schedule"]](step, warmup, end, peak, low, cfg)


def optimizer_of(cfg, trained=False):
    """The optimizer a config runs: 'auto' is Muon, but AdamW at learning_rate when the run starts from trained
    weights (a fine-tune trains at the rate the user set), under FSDP (Muon needs whole matrices) or on a torch
    without torch.optim.Muon (before 2.9)."""
    if cfg["optimizer"] != "auto":
        return cfg["optimizer"]
    return "adamw" if trained or cfg["parallel"] == "fsdp" or not hasattr(torch.optim, "Muon") else "muon"


def make_optimizer(cfg, model, blocks):
    """The optimizers, a list stepped together: AdamW (no decay on norms and biases; a classifier's pooler and
    head at head_lr_mult times the rate), and with cfg["optimizer"] == 'muon' Muon over the 2-D weights inside
    `blocks`, taken out of AdamW's groups."""
    inner = {id(p) for block in blocks for p in block.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    to_muon = lambda p: cfg["optimizer"] == "muon" and p.dim() == 2 and id(p) in inner
    muon, rest = [p for p in params if to_muon(p)], [p for p in params if not to_muon(p)]
    head = {id(p) for name in ("pooler", "cls_head") if model.cfg.head == "classify"
            for p in getattr(model, name).parameters()}
    body = [p for p in rest if id(p) not in head]
    groups = [{"params": [p for p in body if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in body if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms, biases
    if head:  # a classifier's pooler and classifier: their own multiple of the learning rate (set_lr)
        groups.append({"params": [p for p in rest if id(p) in head], "weight_decay": 0.0,
                       "lr_mult": cfg["head_lr_mult"]})
    adamw = torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=True)
    return [adamw] + ([torch.optim.Muon(muon, lr=cfg["muon_lr"], weight_decay=cfg["weight_decay"],
                                        momentum=cfg["muon_momentum"])] if muon else [])


def set_lr(optimizers, cfg, lr):
    """AdamW's groups at lr (times their lr_mult), Muon's at lr * muon_lr / learning_rate: one schedule for all."""
    muon = lr * cfg["muon_lr"] / cfg["learning_rate"] if cfg["learning_rate"] else 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0) if isinstance(opt, torch.optim.AdamW) else muon


def step(optimizers, skip):
    """Update with every optimizer unless `skip` (a float tensor on the device, 1.0: skip the step), decided on
    the device: fused AdamW takes it as found_inf (its kernel leaves weights, moments and step count alone), Muon
    by muon_step. Gradients are already unscaled (fp16: GradScaler.unscale_)."""
    for opt in optimizers:
        if isinstance(opt, torch.optim.AdamW):
            opt.found_inf = skip
            opt.step()
        else:
            muon_step(opt, skip == 0)


@torch.no_grad()
def muon_step(opt, ok):
    """torch.optim.Muon's step, the update applied only where `ok` (a bool tensor on the device): bit for bit torch's
    when ok, nothing changed (weights, momentum) when not. The same state as torch's, so checkpoints are the same."""
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
    for group in opt.param_groups:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))  # as torch's _init_group
            new_buf = buf.lerp(p.grad, 1 - momentum)
            update = p.grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
            update = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
            new_p = p.mul(1 - lr * wd).add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
            buf.copy_(torch.where(ok, new_buf, buf))
            p.copy_(torch.where(ok, new_p, p))
