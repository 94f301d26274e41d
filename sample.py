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

An encoder-decoder (T5) checkpoint generates the target of --source (greedy unless --temperature is
given), or measures exact match and ROUGE (pip install rouge-score) over a split of its seq2seq corpus, next to
the copy baselines:

    python sample.py --ckpt=out-t5-seq2seq --source="def get(self, key, default=None):"
    python sample.py --ckpt=out-t5-seq2seq --exact_match=val
"""
import collections
import os
import re
import sys
import time
from typing import Annotated

import numpy as np
import torch

import checkpoint
import data
import model as M
from common import (UserError, at_least, device_rule, need, nonempty, one_of, parse_config, resolve_device, rule,
                    usage)
from tokenizer import get_tokenizer_from_meta

# arguments (--key=value): each annotated with its type and constraint, checked before any file is read
ckpt: Annotated[str, nonempty] = "out"               # a checkpoint (.pt or sharded .dcp), or a run's folder (newest)
start: str = "\n"                                   # prompt text, or FILE:path to read it from a file
num_samples: Annotated[int, at_least(1)] = 3
max_new_tokens: Annotated[int, at_least(1)] = 300
temperature: Annotated[float, at_least(0.0)] = None  # 0 is greedy; None: 0.8, greedy for an encoder-decoder
top_k: Annotated[int, at_least(1)] = None            # keep the k likeliest tokens
top_p: Annotated[float, rule("in (0, 1]", lambda v: 0 < v <= 1, [0.0, 1.5])] = None  # nucleus: the likeliest
#                                                    tokens whose probabilities add up to this
seed: Annotated[int, at_least(0)] = 1337
device: Annotated[str, device_rule] = "auto"
export: Annotated[str, nonempty] = None              # write the weights as one .pt file (e.g. from a .dcp) and exit
export_hf: Annotated[str, nonempty] = None           # write a Hugging Face folder (config.json, safetensors) and exit
source: str = None                                   # encoder-decoder: the source text (or FILE:path) to answer
exact_match: Annotated[str, one_of("train", "val")] = None  # encoder-decoder: greedy exact match and ROUGE over this
#                                                    split of its seq2seq corpus
RULES = dict(__annotations__)
DEFAULTS = {k: globals()[k] for k in RULES}


def load_model(path, device="cpu"):
    """A Transformer with the weights of a checkpoint (.pt, or a sharded .dcp folder), in eval mode,
    and the checkpoint itself (its meta names the tokenizer)."""
    ckpt = checkpoint.load_checkpoint(path)
    with torch.device("meta"):  # no random init of weights about to be overwritten
        net = M.from_config(M.ModelConfig(**ckpt["model_args"]))
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


@torch.no_grad()
def generate_targets(net, meta, sources, T, max_new_tokens, **sampling):
    """An encoder-decoder's output for each source (token ids, cut to T - 1 and ended by EOS as in training;
    batched with [PAD], which the encoder masks), each up to its EOS."""
    sp, eos = data.special_ids(meta["vocab_size"]), meta["sep_id"]
    rows = [np.r_[np.asarray(s[:T - 1], np.int64), eos] for s in sources]
    x = torch.full((len(rows), max(map(len, rows))), sp.pad, dtype=torch.long)
    for r, ids in enumerate(rows):
        x[r, :len(ids)] = torch.from_numpy(ids)
    x = x.to(net.tok_emb.weight.device)
    out = net.generate(x, max_new_tokens, attn_mask=x != sp.pad, start_id=sp.pad, stop_id=eos, **sampling).tolist()
    return [ids[:ids.index(eos)] if eos in ids else ids for ids in out]


def rouge_scores(preds, refs):
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of the predicted texts against the references, by Google's
    rouge-score package (its tokenizer: lower case, [a-z0-9]+ words; Porter stemming), and exact match: means over
    the pairs, x 100. rouge-score is optional, imported here: without it, a UserError naming its pip command."""
    rouge_scorer = need("rouge_score.rouge_scorer", "rouge-score", "ROUGE")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores, n = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)], max(len(refs), 1)
    return dict({k: 100 * sum(s[k].fmeasure for s in scores) / n for k in ("rouge1", "rouge2", "rougeL")},
                exact_match=100 * sum(p == r for p, r in zip(preds, refs)) / n)


def greedy_texts(net, meta, c, examples, batch_size=64):
    """The greedy output text for each (source, target) example of a fitted seq2seq split c."""
    tok = get_tokenizer_from_meta(meta)
    return [data.show(tok, p, meta["vocab_size"]) for i in range(0, len(examples), batch_size)
            for p in generate_targets(net, meta, [s for s, _ in examples[i:i + batch_size]], c["T"], c["D"],
                                      temperature=0.0)]


def seq2seq_scores(net, meta, c, n):
    """rouge_scores of the greedy outputs for the first n examples (at most all) of a fitted seq2seq split:
    train.py's eval_rouge, at each evaluation."""
    tok, was_training = get_tokenizer_from_meta(meta), net.training
    examples = [data.seq2seq_example(c, k) for k in range(min(n, len(c["ends"]) // 2))]
    preds = greedy_texts(net.eval(), meta, c, examples)
    net.train(was_training)
    return rouge_scores(preds, [tok.decode(t.tolist()) for _, t in examples])


def name_words(source):
    """The first function name in a source as lower-case words (get_systemId -> get system id): a baseline."""
    m = re.search(r"def\s+(\w+)", source)
    return " ".join(re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", m[1]).replace("_", " ").lower().split()) if m else ""


def evaluate_exact_match(net, ckpt, split, rouge=False, batch_size=64):
    """Greedy exact match over every example of a split of the checkpoint's seq2seq corpus (its config's
    data_root/dataset), next to the copy baselines: the source, its first line, the most common training
    target, the function's name as words. Returns {"n", "exact_match", "baselines": {rule: accuracy},
    "too_long": targets that cannot match}, and with rouge "rouge": {"model" or rule: rouge_scores}."""
    cfg = ckpt["config"]
    data_dir, T = os.path.join(cfg["data_root"], cfg["dataset"]), cfg["seq_len"] or net.cfg.block_size
    meta = data.load_meta(data_dir)
    tok, obj = get_tokenizer_from_meta(meta), data.OBJECTIVES["seq2seq"]
    c = {s: obj.fit(obj.open(data_dir, s, meta), T, {"dec_len": 0, **cfg, "label_fraction": 1.0, "seed": 0})
         for s in ("train", split)}  # (every pair)
    examples = [data.seq2seq_example(c[split], k) for k in range(len(c[split]["ends"]) // 2)]
    preds = greedy_texts(net, meta, c[split], examples, batch_size)
    texts = [(tok.decode(s.tolist()), tok.decode(t.tolist())) for s, t in examples]
    common = collections.Counter(tok.decode(data.seq2seq_example(c["train"], k)[1].tolist())
                                 for k in range(len(c["train"]["ends"]) // 2)).most_common(1)[0][0]
    acc = lambda guesses: sum(g == t for g, (_, t) in zip(guesses, texts)) / len(texts)
    guesses = {"source": [s for s, _ in texts], "first line": [s.split("\n")[0] for s, _ in texts],
               f"most common training target {common!r}": [common] * len(texts),
               "the function's name as words": [name_words(s) for s, _ in texts]}
    out = dict(n=len(texts), exact_match=acc(preds), baselines={k: acc(g) for k, g in guesses.items()},
               too_long=sum(len(t) >= c[split]["D"] for _, t in examples))  # cut in training, past max_new_tokens
    if rouge:  # ROUGE-1/2/L of the model and of each baseline
        out["rouge"] = {k: rouge_scores(g, [t for _, t in texts]) for k, g in {"model": preds, **guesses}.items()}
    return out


def read_arg(args, key):
    """args[key], or the text of the file it names as FILE:path."""
    text = args[key]
    if text is None or not text.startswith("FILE:"):
        return text
    try:
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{key}={text!r}: cannot read the file ({e.strerror})") from None


def main(argv):
    """The command line; a user error is one line on stderr and exit status 2."""
    if {"-h", "--help"} & set(argv):
        return print(usage(__doc__, DEFAULTS, RULES, __file__)) or 0
    try:
        sample(parse_config(argv, DEFAULTS, RULES, "sample.py"))
    except UserError as e:
        return print(f"sample.py: error: {e}", file=sys.stderr) or 2
    return 0


def sample(args):
    """Print samples (or filled [MASK]s, or labels) from the checkpoint `args["ckpt"]`; or export it."""
    cuda = torch.cuda.is_available()
    device = resolve_device(args["device"], cuda, cuda and torch.cuda.device_count(), torch.backends.mps.is_available())
    start, source = read_arg(args, "start"), read_arg(args, "source")
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
    tok = get_tokenizer_from_meta(ckpt["meta"])
    enc_dec = net.cfg.n_dec_layer > 0
    temperature = args["temperature"] if args["temperature"] is not None else 0.0 if enc_dec else 0.8
    if (source is not None or args["exact_match"]) and not enc_dec:
        raise UserError("--source and --exact_match need an encoder-decoder checkpoint (objective='span' or "
                        "'seq2seq')")
    if enc_dec and args["exact_match"]:
        try:  # ROUGE when rouge-score is installed; exact match always
            rouge = bool(need("rouge_score.rouge_scorer", "rouge-score", "ROUGE"))
        except UserError as e:
            rouge = print(f"no ROUGE: {e}")
        r = evaluate_exact_match(net, ckpt, args["exact_match"], rouge=rouge)
        print(f"exact match on {args['exact_match']}: {r['exact_match']:.1%} of {r['n']} examples (greedy)"
              + (f"; {r['too_long']} targets are longer than the decoder's length and cannot match"
                 if r["too_long"] else ""))
        print("copy baselines: " + ", ".join(f"{k} {v:.1%}" for k, v in r["baselines"].items()))
        for k, v in r.get("rouge", {}).items():
            print(f"ROUGE-1/2/L {v['rouge1']:.1f} / {v['rouge2']:.1f} / {v['rougeL']:.1f}: {k}")
        return
    if enc_dec:
        if source is None:
            raise UserError("an encoder-decoder checkpoint generates the target of --source='...' (or measures "
                            "--exact_match=val)")
        g = torch.Generator(device=device).manual_seed(args["seed"])
        T = ckpt["config"]["seq_len"] or net.cfg.block_size
        for i in range(args["num_samples"] if temperature else 1):  # greedy: one answer
            ids = generate_targets(net, ckpt["meta"], [tok.encode(source)], T, args["max_new_tokens"],
                                   temperature=temperature, top_k=args["top_k"], top_p=args["top_p"], generator=g)
            print(data.show(tok, ids[0], ckpt["meta"]["vocab_size"]))  # sentinels as <k>
            print(f"---------- sample {i + 1}")
        return
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
            print(fill_masks(net, tok, ckpt["meta"], start, temperature, args["top_k"], g))
            print(f"---------- sample {i + 1}")
        return
    ids = tok.encode(start) or [tok.sep_id]  # an empty prompt starts a fresh document
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args["seed"])
    for i in range(args["num_samples"]):
        t0 = time.time()
        y = net.generate(x, args["max_new_tokens"], temperature=temperature, top_k=args["top_k"],
                         top_p=args["top_p"], generator=g, vocab=ckpt["meta"]["vocab_size"])
        print(tok.decode(y[0].tolist()))
        print(f"---------- sample {i + 1}: {args['max_new_tokens'] / (time.time() - t0):.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
