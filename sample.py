"""
Generate text from a checkpoint, decoding with the tokenizer recorded in the data's meta.json.

    python sample.py                                   # out/ckpt.pt, a few samples from a newline
    python sample.py --ckpt=out/best.pt --start="def main(" --num_samples=3 --temperature=0.8 --top_k=50
    python sample.py --start=FILE:prompt.txt --temperature=0   # greedy
"""
import argparse
import os
import time

import torch

import model as M
import prepare
import train


def load_model(path, device="cpu"):
    """A Transformer with the weights of a checkpoint (.pt, or a sharded .dcp folder), in eval mode,
    and the checkpoint itself (its meta names the tokenizer)."""
    ckpt = train.load_checkpoint(path)
    net = M.Transformer(M.ModelConfig(**ckpt["model_args"]))
    train.restore(ckpt, net)
    return net.to(device).eval(), ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"), help="checkpoint file (ckpt.pt or best.pt)")
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

    net, ckpt = load_model(args.ckpt, args.device)
    if args.export:
        keep = {k: v for k, v in ckpt.items() if k in ("model_args", "meta", "config", "step", "best_val")}
        train.save_file(dict(keep, model=net.state_dict()), args.export)
        return print(f"wrote {args.export}: {net.num_params():,} parameters, step {ckpt['step']}")
    tok = prepare.get_tokenizer_from_meta(ckpt["meta"])
    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
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
