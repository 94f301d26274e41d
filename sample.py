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
import argparse
import time

import torch

import checkpoint
import data
import model as M
import prepare


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="a checkpoint (.pt or sharded .dcp), or a run's out_dir: its newest")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the smallest set with this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--export", default=None, help="write the checkpoint's weights as one .pt file (e.g. from a "
                   "sharded FSDP ckpt.dcp) to this path and exit")
    args = p.parse_args(argv)

    path = checkpoint.find_checkpoint(args.ckpt)
    if path is None:
        raise SystemExit(f"no checkpoint in {args.ckpt}; train first (python train.py) or pass --ckpt=PATH")
    net, ckpt = load_model(path, args.device)
    if args.export:
        keep = {k: v for k, v in ckpt.items() if k in ("model_args", "meta", "config", "step", "best_val")}
        checkpoint.save_file(dict(keep, model=net.state_dict()), args.export)
        return print(f"wrote {args.export}: {net.num_params():,} parameters, step {ckpt['step']}")
    tok = prepare.get_tokenizer_from_meta(ckpt["meta"])
    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    if net.cfg.head == "classify":
        probs = net(encoder_input(net, tok, ckpt["meta"], start))[0][0].float().softmax(-1)
        for p, k in zip(*probs.topk(min(5, len(probs)))):
            print(f"{p.item():.3f}  {ckpt['meta']['labels'][k]}")
        return
    if net.cfg.head == "mlm_nsp":
        if "[MASK]" not in start:
            raise SystemExit("an MLM checkpoint fills in [MASK]s: put [MASK] where tokens should go, e.g. "
                             "--start='return [MASK][MASK]'")
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        for i in range(args.num_samples):
            print(fill_masks(net, tok, ckpt["meta"], start, args.temperature, args.top_k, g))
            print(f"---------- sample {i + 1}")
        return
    ids = tok.encode(start) or [tok.sep_id]  # an empty prompt starts a fresh document
    x = torch.tensor([ids], dtype=torch.long, device=args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        t0 = time.time()
        y = net.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=g)
        print(tok.decode(y[0].tolist()))
        print(f"---------- sample {i + 1}: {args.max_new_tokens / (time.time() - t0):.0f} tokens/s")


if __name__ == "__main__":
    main()
