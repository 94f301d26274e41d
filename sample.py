"""
Generate text from a checkpoint, decoding with the tokenizer recorded in the data's meta.json.

    python sample.py                                   # the newest checkpoint in out/, a few samples
    python sample.py --ckpt=out/best.pt --start="def main(" --num_samples=3 --temperature=0.8 --top_k=50
    python sample.py --start=FILE:prompt.txt --temperature=0   # greedy

An MLM (BERT) checkpoint fills in each [MASK] of the text instead, one token per [MASK] (a byte
with the bytes tokenizer), the most confident position first, each filled token then context for
the others; a classify checkpoint prints the most likely labels of the text:

    python sample.py --ckpt=out-bert --start=$'def f(x):\n    [MASK][MASK][MASK][MASK][MASK][MASK] x' --temperature=0
    python sample.py --ckpt=out-classify --start=FILE:snippet.py
"""
import sys
import time
from typing import Annotated

import torch

import checkpoint
import data
import model as M
import prepare
from common import UserError, at_least, device_rule, nonempty, parse_config, resolve_device, rule, usage

# arguments (--key=value): each annotated with its type and constraint, checked before any file is read
ckpt: Annotated[str, nonempty] = "out"               # a checkpoint (.pt or sharded .dcp), or a run's out_dir: its newest
start: str = "\n"                                   # prompt text, or FILE:path to read it from a file
num_samples: Annotated[int, at_least(1)] = 3
max_new_tokens: Annotated[int, at_least(1)] = 300
temperature: Annotated[float, at_least(0.0)] = 0.8   # 0 is greedy
top_k: Annotated[int, at_least(1)] = None            # keep the k likeliest tokens
top_p: Annotated[float, rule("in (0, 1]", lambda v: 0 < v <= 1, [0.0, 1.5])] = None  # nucleus: the smallest set with this mass
seed: Annotated[int, at_least(0)] = 1337
device: Annotated[str, device_rule] = "auto"
export: Annotated[str, nonempty] = None              # write the checkpoint's weights as one .pt file (e.g. from a sharded .dcp) and exit
export_hf: Annotated[str, nonempty] = None           # write a Hugging Face folder (config.json, model.safetensors) and exit
RULES = dict(__annotations__)
DEFAULTS = {k: globals()[k] for k in RULES}


def load_model(path, device="cpu"):
    """A Transformer with the weights of a checkpoint (.pt, or a sharded .dcp folder), in eval mode,
    and the checkpoint itself (its meta names the tokenizer)."""
    ckpt = checkpoint.load_checkpoint(path)
    with torch.device("meta"):  # no random init of weights about to be overwritten
        net = M.Transformer(M.ModelConfig(**ckpt["model_args"]))
    net.to_empty(device=device)
    net.init_buffers()  # the tied head and RoPE tables, which to_empty() does not keep
    checkpoint.restore(ckpt, net)
    return net.eval(), ckpt


def encoder_input(net, tok, meta, text):
    """[CLS] text [SEP] as a (1, T) tensor, "[MASK]" in the text becoming the mask token."""
    sp, parts = data.special_ids(meta["vocab_size"]), text.split("[MASK]")
    ids = [sp.cls] + [i for k, part in enumerate(parts) for i in tok.encode(part) + [sp.mask] * (k < len(parts) - 1)]
    ids = ids[:net.cfg.block_size - 1] + [sp.sep]
    return torch.tensor([ids], dtype=torch.long, device=net.tok_emb.weight.device)


@torch.no_grad()
def fill_masks(net, tok, meta, text, temperature=0.0, top_k=None, generator=None):
    """text with every [MASK] filled by the MLM head: one forward pass per mask, filling the position
    the model is surest of first (a filled token is context for the rest). Specials are never drawn."""
    x, mask_id = encoder_input(net, tok, meta, text), data.special_ids(meta["vocab_size"]).mask
    while (x == mask_id).any():
        (logits, _), _ = net(x)
        logits = logits[0].float()  # (T, V)
        logits[:, meta["vocab_size"]:] = logits[:, meta["sep_id"]] = float("-inf")  # text tokens only
        holes = (x[0] == mask_id).nonzero()[:, 0]
        pos = holes[logits[holes].softmax(-1).max(-1).values.argmax()]
        x[0, pos] = M.sample_next(logits[pos:pos + 1], temperature, top_k, generator=generator)[0]
    return tok.decode(x[0].tolist())


def main(argv):
    """The command line; a user error is one line on stderr and exit status 2."""
    if {"-h", "--help"} & set(argv):
        return print(usage(__doc__, DEFAULTS, RULES)) or 0
    try:
        sample(parse_config(argv, DEFAULTS, RULES, "sample.py"))
    except UserError as e:
        return print(f"sample.py: error: {e}", file=sys.stderr) or 2
    return 0


def sample(args):
    """Print samples (or filled [MASK]s, or labels) from the checkpoint `args["ckpt"]`; or export it."""
    cuda = torch.cuda.is_available()
    device = resolve_device(args["device"], cuda, cuda and torch.cuda.device_count(), torch.backends.mps.is_available())
    start = args["start"]
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"start={args['start']!r}: cannot read the prompt file ({e.strerror})") from None
    path = checkpoint.find_checkpoint(args["ckpt"])
    if path is None:
        raise UserError(f"no checkpoint in {args['ckpt']}; train first (python train.py) or pass --ckpt=PATH")
    net, ckpt = load_model(path, device)
    if args["export"]:
        keep = {k: v for k, v in ckpt.items() if k in ("model_args", "meta", "config", "step", "best_val")}
        checkpoint.save_file(dict(keep, model=net.state_dict()), args["export"])
        return print(f"wrote {args['export']}: {net.num_params():,} parameters, step {ckpt['step']}")
    if args["export_hf"]:
        import hf  # optional dependencies (safetensors) only on this path
        hf.export(net, ckpt, args["export_hf"])
        return
    tok = prepare.get_tokenizer_from_meta(ckpt["meta"])
    if net.cfg.head == "classify":
        probs = net(encoder_input(net, tok, ckpt["meta"], start))[0][0].float().softmax(-1)
        for p, k in zip(*probs.topk(min(5, len(probs)))):
            print(f"{p.item():.3f}  {ckpt['meta']['labels'][k]}")
        return
    if net.cfg.head == "mlm_nsp":
        if "[MASK]" not in start:
            raise UserError("an MLM checkpoint fills in [MASK]s: put [MASK] where tokens should go, e.g. "
                             "--start='return [MASK][MASK]'")
        g = torch.Generator(device=device).manual_seed(args["seed"])
        for i in range(args["num_samples"]):
            print(fill_masks(net, tok, ckpt["meta"], start, args["temperature"], args["top_k"], g))
            print(f"---------- sample {i + 1}")
        return
    ids = tok.encode(start) or [tok.sep_id]  # an empty prompt starts a fresh document
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args["seed"])
    for i in range(args["num_samples"]):
        t0 = time.time()
        y = net.generate(x, args["max_new_tokens"], temperature=args["temperature"], top_k=args["top_k"],
                         top_p=args["top_p"], generator=g, vocab=ckpt["meta"]["vocab_size"])
        print(tok.decode(y[0].tolist()))
        print(f"---------- sample {i + 1}: {args['max_new_tokens'] / (time.time() - t0):.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
