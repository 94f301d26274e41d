"""
The data format, its readers, and the objectives: each objective is one record in OBJECTIVES, beside its batch
builder: next-token windows (clm), MLM + NSP pairs (mlm_nsp), labelled rows (classify), and for the
encoder-decoder T5's span corruption (span) and source/target pairs (seq2seq). A record says which model head the
objective trains, the ids it adds to the vocabulary, its built-in corpus and model, how it opens and fits a split,
its batches, its metrics, and how the log shows a sample; train.py, logger.py and the config rules read it.
prepare.py writes the format below; everything else reads it only through this file, which needs nothing of
prepare.py.

Data format (the one place it is written down)
----------------------------------------------
A prepared corpus is a folder data/NAME/ holding three files:

  train.bin, val.bin  flat arrays of token ids in native byte order, uint16 when
                      vocab_size <= 65536, else uint32. Documents are concatenated
                      and every document is FOLLOWED by the separator id sep_id,
                      so each file is a sequence of separator-terminated documents
                      (number of documents == number of sep_id tokens).
  meta.json           tokenizer     "bytes", a tiktoken encoding like "gpt2", or the absolute path of a
                                  tiktoken BPE file or of a Hugging Face tokenizer.json
                      vocab_size    base vocabulary size, separator included
                      dtype         "uint16" or "uint32", the dtype of both .bin files
                      sep_id        the document separator id
                      train_tokens, val_tokens   number of ids in train.bin / val.bin
                      train_docs, val_docs       number of documents in each
                      train_max_id, val_max_id   the largest token id in each (checked against
                                  the model's vocabulary without reading the files)
                      train_bytes, val_bytes     the UTF-8 bytes of each split's documents
                                  (separators excluded): bits per byte divide by them
                                  (the *_max_id and *_bytes keys are computed once and added by
                                  data.max_ids for a corpus made before them)
                      source        short description of the inputs
                      inputs        the inputs, in order: absolute paths (globs kept) and
                                  "hf:NAME[/CONFIG]:SPLIT" for a streamed Hugging Face dataset
                      val_fraction, val_docs_limit   the split rule below (limit null: none)

meta.json is written last: a folder without it is not a finished corpus.
Documents are numbered in input order, from 0; document i goes to val.bin when
floor(i * F) > floor((i - 1) * F), F = val_fraction as an exact decimal fraction
(0.05: i % 20 == 0, the fixed rule of the built-in corpora), until val_docs_limit
documents are there, and to train.bin otherwise. prepare.py --append continues the
numbering (and the rule) of the corpus, so appending equals one run over all inputs.
A corpus of fewer than 1/F documents (one text file, say) is split inside each document
instead, as nanoGPT splits its one file: the first 1 - F of its text (to a line boundary)
goes to train.bin, the rest to val.bin, each a document of its own; meta.json then has
split_inside: true (such a corpus cannot be appended to).

Labelled corpora (for classification fine-tuning; prepare.py --classify, or the built-in
"stdlib_modules") are the same three files, where each document is one example, plus
  meta.json           labels        the class names; class i is labels[i]
  train_labels.npy, val_labels.npy  int64 class id of each document, in order

Labelled corpora keep the fixed rule (line i of the inputs to val when i % 20 == 0) and
have no inputs / val_fraction / val_docs_limit.

Seq2seq corpora (prepare.py --seq2seq, or the built-in "stdlib_params") are the same three files,
where example k is two documents in a row: document 2k its source, 2k+1 its target (so each split
holds an even number of documents; example k goes to val.bin when k % 20 == 0), plus
  meta.json           seq2seq       true

The encoder objectives (MLM + NSP, classification) add 4 special tokens after the base
vocabulary, nowhere in the files: [CLS] [SEP] [MASK] [PAD] = vocab_size + 0, 1, 2, 3. The
encoder-decoder objectives (span, seq2seq) add T5's 100 sentinels after those: sentinel k =
vocab_size + 4 + k. Their decoder starts from [PAD] (as T5's does), and the end of a sequence
(T5's EOS) is the separator sep_id.
A model's vocab_size may be larger still (train.py's pad_vocab_to, see model_vocab):
those rows are never a target and never sampled.

Tokenizers: see tokenizer.py.

Batches
-------
A batch is a dict of numpy arrays named like Transformer.forward's arguments; to_device() makes them
tensors. The rows of a training step are numbered globally (micro-step, then rank, then row), and each
is a pure function of (seed, step, row number): resuming needs no sampler state, and every world size
sees the same global batch. Validation rows are fixed: the same at every evaluation and in every run.
"""
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, atomic_write, mix_seed
from model import HEAD_PREFIXES, mlm_positions
from tokenizer import get_tokenizer_from_meta

# -----------------------------------------------------------------------------
# reading a prepared corpus

def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{path} not found: {data_dir} is not a prepared corpus; make one with: "
                        f"python prepare.py --input=YOUR_TEXT_FILES --name={Path(data_dir).name}")
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("tokenizer", "vocab_size", "dtype", "sep_id", "train_tokens", "val_tokens")
                   if k not in meta]
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is not valid meta.json ({e}); re-run prepare.py") from e
    if missing:
        raise UserError(f"{path} lacks {missing}; re-run prepare.py")
    return meta


def max_ids(data_dir):
    """meta.json with train_max_id, val_max_id, train_bytes and val_bytes. prepare.py records them; for an older
    corpus they are computed here once and cached in meta.json (call it from one rank, before the others read)."""
    meta = load_meta(data_dir)
    if all(f"{s}_{k}" in meta for s in ("train", "val") for k in ("max_id", "bytes")):
        return meta
    for split in ("train", "val"):
        a = load_split(data_dir, split, meta)
        meta[f"{split}_max_id"] = max(int(a[i:i + (1 << 26)].max()) for i in range(0, len(a), 1 << 26))
        try:  # decoding needs the tokenizer: without it (tiktoken offline, no cache) no bits per byte
            meta[f"{split}_bytes"] = text_bytes(Path(data_dir) / f"{split}.bin", meta["dtype"],
                                                get_tokenizer_from_meta(meta))
        except UserError:
            pass
    try:
        atomic_write(Path(data_dir) / "meta.json", json.dumps(meta, indent=2) + "\n")
    except OSError:  # a read-only corpus: computed again next time
        pass
    return meta


def text_bytes(path, dtype, tok, chunk=1 << 24):
    """The UTF-8 bytes of the documents in a split file (the denominator of bits per byte), decoded a chunk at
    a time; a chunk ends after a separator, so no character is cut (unless one document is longer than a chunk)."""
    ids, n, i = np.memmap(path, dtype=dtype, mode="r") if Path(path).stat().st_size else [], 0, 0
    while i < len(ids):
        part = np.asarray(ids[i:i + chunk])
        ends = np.flatnonzero(part == tok.sep_id)
        part = part[:ends[-1] + 1] if len(ends) and i + chunk < len(ids) else part
        text = part[part != tok.sep_id]
        n += len(text) if tok.name == "bytes" else len(tok.decode(text.tolist()).encode("utf-8"))  # bytes: one per id
        i += len(part)
    return n


def load_split(data_dir, split, meta=None):
    """train.bin or val.bin as a read-only memmap, checked against meta.json (split is "train" or "val")."""
    meta = meta or load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise UserError(f"{path} is missing; re-run prepare.py --name={Path(data_dir).name} ...")
    size, n = path.stat().st_size, meta[f"{split}_tokens"]
    expect = n * np.dtype(meta["dtype"]).itemsize
    if size != expect:
        raise UserError(f"{path} holds {size} bytes but meta.json says {n} {meta['dtype']} tokens "
                        f"({expect} bytes): the file is truncated or stale; re-run prepare.py")
    if size == 0:
        raise UserError(f"{path} is empty; re-run prepare.py on more text")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def _positions(data, pred, chunk=1 << 26):
    """np.flatnonzero(pred(data)) a chunk at a time, so a large memmap is never expanded whole."""
    found = [np.flatnonzero(pred(np.asarray(data[i:i + chunk]))) + i for i in range(0, len(data), chunk)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def documents(data_dir, split, meta):
    """One split with its documents indexed once: document d is data[starts[d]:ends[d]] (ends[d] is the
    position of its separator)."""
    data = load_split(data_dir, split, meta)
    ends = _positions(data, lambda a: a == meta["sep_id"])
    if not len(ends):  # an evaluation over nothing would report a loss of 0
        raise UserError(f"{data_dir}: the {split} split holds no documents; re-run prepare.py on more examples")
    return dict(data=data, starts=np.concatenate(([0], ends[:-1] + 1)), ends=ends, base=meta["vocab_size"],
                sep_id=meta["sep_id"], name=f"{data_dir}/{split}")


def label_subset(n, fraction, seed):
    """The labelled training examples a run draws from: the first ceil(fraction * n) of a permutation of the n
    seeded by `seed` (all n in order at 1.0). A smaller fraction's subset lies inside a larger one's (same seed),
    and the subset is a function of its arguments, so resume needs no state."""
    if fraction >= 1.0:
        return np.arange(n)
    k = math.ceil(round(fraction * n, 6))  # (round: 0.1 * 4030 is 403.00000000000006, which is 403 examples)
    return np.random.default_rng((seed, 0x1abe1)).permutation(n)[:k]


def to_device(batch, device):
    """A batch of numpy arrays as tensors on `device`: from pinned memory without blocking on CUDA."""
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()}


def stack(rows):
    """Row dicts -> one batch dict of (B, ...) arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# -----------------------------------------------------------------------------
# an objective: one record, read by train.py (the model it needs, its splits and batches, its metrics),
# logger.py (its metrics and samples) and the config rules

@dataclass(frozen=True)
class Objective:
    head: str                  # the model head it trains (model.HEADS)
    decoder: bool              # it trains an encoder-decoder (n_dec_layer > 0); the others a model without one
    extra_tokens: int          # ids it adds after the base vocabulary (specials, sentinels), nowhere in the files
    corpus: str                # the built-in corpus a run uses when dataset is unset (prepare.py makes it)
    model: str                 # the preset a run uses when model is unset
    open: Callable             # (data_dir, "train" | "val", meta) -> the split, indexed once
    fit: Callable              # (split, T, cfg) -> the split for rows of T tokens, checked (T, and D: the decoder's)
    batch: Callable            # (split, rows, n_rows, seed=None, step=None) -> {name: (B, ...) array}, see below
    show: Callable             # (model, device batch, numpy batch, tokenizer, meta) -> the log's sample (one row)
    metrics: tuple = ("loss",)  # names of metric_sums' (sum, count) pairs, in order
    metric_sums: Callable = None  # (logits, loss, device batch) -> float64 (2 * len(metrics),); None: the loss's
    examples: bool = False     # its split is a list of examples: label_fraction may take a share of them
    bits_per_byte: bool = False  # its loss is a code length of the text (val_bpb is logged)


# batch(split, rows, n_rows, seed, step): rows (a range of global row numbers) of training step `step`, whose
# global batch has n_rows, each row drawn by a generator seeded with (seed, step, row); without seed, rows of the
# fixed validation set of n_rows rows. The arrays are named like the model's forward() arguments.
OBJECTIVES = {}


def lm_sums(logits, loss, batch):
    n = (batch["targets"] != -1).sum()
    return torch.stack([loss.detach().double() * n, n.double()])


@torch.no_grad()
def metric_sums(obj, logits, loss, batch):
    """(sum, count) of each of obj.metrics over one batch, flattened to a float64 vector: sums add up across
    micro-batches, evaluation batches and ranks (one all_reduce), and metrics_from_sums() divides at the end."""
    return (obj.metric_sums or lm_sums)(logits, loss, batch)


def metrics_from_sums(obj, sums):
    """{name: mean} from metric_sums vectors added up; "loss" is the total (for mlm_nsp L_MLM + L_NSP)."""
    sums = sums.tolist() if torch.is_tensor(sums) else sums  # train.py reads them to the host itself
    out = {name: sums[2 * i] / max(sums[2 * i + 1], 1) for i, name in enumerate(obj.metrics)}
    out["loss"] = sum(v for k, v in out.items() if k.endswith("loss"))
    return out


def ce_acc(lg, y):
    """[summed cross-entropy, count, correct predictions, count] of logits lg over the labels y != -1: masked
    sums, not lg[y != -1], so shapes stay fixed and nothing syncs."""
    lg, y = lg.float().flatten(0, -2), y.flatten()
    n = (y != -1).sum()
    ce = F.cross_entropy(lg, y, ignore_index=-1, reduction="none")  # 0 where y == -1
    return [ce.sum(), n, (lg.argmax(-1) == y).sum(), n]  # argmax is never -1


# -----------------------------------------------------------------------------
# clm: next-token windows of the concatenated documents

def windows(data, starts, T):
    """Next-token rows: data[s:s+T] as inputs, data[s+1:s+T+1] as targets, (B, T) each."""
    x = np.stack([data[s:s + T] for s in starts]).astype(np.int64)
    y = np.stack([data[s + 1:s + T + 1] for s in starts]).astype(np.int64)
    return {"idx": x, "targets": y}


def clm_batch(split, rows, n_rows, seed=None, step=None):
    """Training: n_rows windows at starts drawn with the generator (seed, step); validation: n_rows evenly spaced."""
    data, T = split["data"], split["T"]
    if seed is None:
        starts = np.linspace(0, len(data) - T - 1, n_rows).astype(np.int64).tolist()
    else:
        starts = torch.randint(len(data) - T - 1, (n_rows,), generator=torch.Generator().manual_seed(
            mix_seed(seed, step))).tolist()
    return windows(data, starts[rows.start:rows.stop], T)


SAMPLE_PROMPT, SAMPLE_TOKENS = 32, 64  # the log's samples: the first 32 tokens of a row, continued by 64


@torch.no_grad()
def show_continuation(net, b, batch, tok, meta):
    """The row's first SAMPLE_PROMPT tokens, continued greedily for SAMPLE_TOKENS."""
    n = min(SAMPLE_PROMPT, b["idx"].size(1))
    out = net.generate(b["idx"][:, :n], SAMPLE_TOKENS, temperature=0.0, use_cache=False)[0].tolist()
    return f"{tok.decode(out[:n])!r} -> {tok.decode(out[n:])!r}"


OBJECTIVES["clm"] = Objective(
    head="lm", decoder=False, extra_tokens=0, corpus="pystdlib", model="tiny",
    open=lambda data_dir, split, meta: dict(data=load_split(data_dir, split, meta), name=f"{data_dir}/{split}"),
    fit=lambda split, T, cfg: dict(split, T=T), batch=clm_batch, show=show_continuation, bits_per_byte=True)

# -----------------------------------------------------------------------------
# the encoder objectives (BERT): special tokens, MLM + NSP pairs, labelled examples

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")  # ids base vocab_size + 0..3
N_SPECIAL = len(SPECIAL_TOKENS)
MASK_PROB = 0.15  # MLM: chosen share of the real tokens of a pair; of those 80% [MASK], 10% random, 10% kept


def model_vocab(n, pad_to=0):
    """The model's vocab_size for n ids (the tokenizer's, and the specials): n rounded up to a multiple of pad_to
    (0: n), as nanoGPT's 50304 for GPT-2's 50257, for faster matmuls. The rows past n are never a target (no
    corpus holds those ids) and never sampled (sample.py draws only the tokenizer's ids)."""
    return -(-n // pad_to) * pad_to if pad_to else n


def special_ids(base_vocab):
    return SimpleNamespace(cls=base_vocab, sep=base_vocab + 1, mask=base_vocab + 2, pad=base_vocab + 3)


def show(tok, ids, base):
    """Token ids as text, T5's sentinels as <k> and the other specials ([PAD]...) left out."""
    runs = itertools.groupby(ids, lambda i: i < base)
    return "".join(tok.decode(list(g)) if text else "".join(f"<{i - base - N_SPECIAL}>" for i in g
                                                            if i >= base + N_SPECIAL) for text, g in runs)


def newline_tokens(meta):
    """Boolean table over the base vocabulary: does the token's text hold a newline (a line boundary)."""
    if meta["tokenizer"] == "bytes":
        return np.arange(meta["vocab_size"]) == 10
    tok = get_tokenizer_from_meta(meta)
    return np.array(["\n" in tok.decode([i]) for i in range(meta["vocab_size"])])


def lines_corpus(data_dir, split, meta):
    """One split for MLM + NSP: documents() and the newline positions (pairs are cut at line boundaries)."""
    c = documents(data_dir, split, meta)
    table = newline_tokens(meta)
    c["nl"] = _positions(c["data"], lambda a: table[a])
    if ((c["ends"] - c["starts"]) >= 2).sum() < 2:
        raise UserError(f"{c['name']}: next sentence prediction needs at least two documents of 2+ tokens")
    return c


def mlm_nsp_batch(c, rows, n_rows, seed=None, step=None):
    """Training: pairs drawn per row; validation: row i is the i-th fixed pair (its generator seeded with i)."""
    return stack([mlm_nsp_pair(c, c["T"], np.random.default_rng((seed, step, i) if seed is not None else (i,)))
                  for i in rows])


def _random_line(c, rng, min_len, avoid=-1):
    """(document, line start) at a token drawn uniformly from the split, in a document other than `avoid`
    with >= min_len tokens, moved back to where its line begins (and leaving min_len tokens)."""
    while True:
        p = int(rng.integers(len(c["data"])))
        d = int(np.searchsorted(c["ends"], p))  # the first separator at or after p ends p's document
        s, e = int(c["starts"][d]), int(c["ends"][d])
        if d != avoid and e - s >= min_len and p < e:  # (not the separator itself)
            break
    k = int(np.searchsorted(c["nl"], p)) - 1  # the last newline before p
    a = max(s, int(c["nl"][k]) + 1) if k >= 0 else s
    return d, min(a, e - min_len)


def mlm_nsp_pair(c, T, rng):
    """[CLS] A [SEP] B [SEP] [PAD]..., masked. A starts at a line start; the A|B cut is a line boundary
    where [a, a + T-3) has one. IsNext (label 0): B is the text after A, to T-3 tokens in all or the
    document's end. NotNext (label 1): B starts at a line start in another document. A is drawn the
    same way for both labels, so its length says nothing about the label."""
    data, sp, n = c["data"], special_ids(c["base"]), T - 3
    d, a = _random_line(c, rng, 2)
    hi = min(a + n, int(c["ends"][d]))
    lo_i, hi_i = np.searchsorted(c["nl"], (a, hi - 1))
    cuts = c["nl"][lo_i:hi_i] + 1  # positions q in (a, hi) right after a newline
    cut = int(cuts[rng.integers(len(cuts))]) if len(cuts) else int(rng.integers(a + 1, hi))
    is_next = rng.random() < 0.5
    if is_next:
        b0, b1 = cut, hi
    else:
        d2, b0 = _random_line(c, rng, 1, avoid=d)
        b1 = min(b0 + n - (cut - a), int(c["ends"][d2]))
    la, lb = cut - a, b1 - b0
    x = np.full(T, sp.pad, np.int64)
    x[0], x[1:1 + la], x[1 + la] = sp.cls, data[a:cut], sp.sep
    x[2 + la:2 + la + lb], x[2 + la + lb] = data[b0:b1], sp.sep
    types = np.zeros(T, np.int64)
    types[2 + la:3 + la + lb] = 1  # segment B and its [SEP]
    targets = mask_tokens(x, np.r_[1:1 + la, 2 + la:2 + la + lb], rng, c["base"], c["sep_id"])
    return dict(idx=x, targets=targets, token_type_ids=types, attn_mask=x != sp.pad, labels=np.int64(not is_next))


def mask_tokens(x, real, rng, base, sep_id):
    """BERT's dynamic masking of x in place: round(MASK_PROB * len(real)) (at least 1) of the `real`
    positions are chosen; of those 80% become [MASK], 10% a random base token (never the separator),
    10% stay. Returns the targets: the original id at chosen positions, -1 (ignored) elsewhere."""
    k = max(1, int(MASK_PROB * len(real) + 0.5))
    chosen = rng.choice(real, k, replace=False)
    targets = np.full(len(x), -1, np.int64)
    targets[chosen] = x[chosen]
    r = rng.random(k)
    x[chosen[r < 0.8]] = special_ids(base).mask
    rand = chosen[(r >= 0.8) & (r < 0.9)]
    tok = rng.integers(base - 1, size=len(rand))
    x[rand] = tok + (tok >= sep_id)  # skip the separator id
    return targets


def mlm_nsp_sums(logits, loss, batch):  # the MLM logits are at mlm_positions: gather the targets the same way
    t = batch["targets"]
    return torch.stack([v.double() for v in ce_acc(logits[0], t.gather(1, mlm_positions(t)))
                        + ce_acc(logits[1], batch["labels"])])


@torch.no_grad()
def show_mask_fill(net, b, batch, tok, meta):
    """The pair with each masked token replaced by the prediction, in «», and how many are right."""
    base = meta["vocab_size"]
    (mlm, nsp), _ = net(**b)  # mlm (1, K, V) at the K slots of mlm_positions
    mlm[..., base:] = mlm[..., meta["sep_id"]] = float("-inf")  # text tokens only
    pos, pred = mlm_positions(b["targets"])[0].tolist(), mlm[0].argmax(-1).tolist()
    truth, sep = batch["targets"][0], special_ids(base).sep
    fills = {p: y for p, y in zip(pos, pred) if truth[p] != -1}  # position: predicted id
    ids = [fills.get(j, i) for j, i in enumerate(batch["idx"][0].tolist())]
    groups = itertools.groupby(enumerate(ids), lambda ji: "sep" if ji[1] == sep else ji[0] in fills)
    shown = "".join(" [SEP] " if k == "sep" else ("«{}»" if k else "{}").format(tok.decode([i for _, i in g]))
                    for k, g in groups)
    right = "right" if nsp.argmax(-1)[0].item() == batch["labels"][0] else "wrong"
    return (f"{shown.strip()!r} ({sum(y == truth[p] for p, y in fills.items())}/{len(fills)} masked tokens right, "
            f"next sentence {right})")


OBJECTIVES["mlm_nsp"] = Objective(
    head="mlm_nsp", decoder=False, extra_tokens=N_SPECIAL, corpus="pystdlib", model="bert-tiny", open=lines_corpus,
    fit=lambda split, T, cfg: dict(split, T=T), batch=mlm_nsp_batch, show=show_mask_fill,
    metrics=("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"), metric_sums=mlm_nsp_sums)


def labelled_corpus(data_dir, split, meta):
    """One split of a labelled corpus: documents() and their labels."""
    if "labels" not in meta:
        raise UserError(f"{data_dir} has no labels (meta.json 'labels'); objective='classify' needs a labelled "
                        f"corpus: prepare.py --classify --name=NAME --input=FILE.jsonl")
    c = documents(data_dir, split, meta)
    c["labels"] = np.load(Path(data_dir) / f"{split}_labels.npy")
    if len(c["labels"]) != len(c["ends"]):
        raise UserError(f"{data_dir}: {len(c['labels'])} {split} labels for {len(c['ends'])} documents; "
                        f"re-run prepare.py")
    return c


def fit_examples(split, T, cfg):
    """A split of examples for rows of T tokens; training draws only from label_subset (label_fraction)."""
    return dict(split, T=T, subset=label_subset(len(split["ends"]), cfg["label_fraction"], cfg["seed"]))


def classify_batch(c, rows, n_rows, seed=None, step=None):
    """Training: examples drawn from c["subset"]; validation: example i, label -1 (ignored) past the end."""
    pick = c.get("subset", np.arange(len(c["ends"])))
    return stack([classify_row(c, c["T"], int(pick[np.random.default_rng((seed, step, i)).integers(len(pick))])
                               if seed is not None else i) for i in rows])


def classify_row(c, T, i):
    """Example i as [CLS] text [SEP] [PAD]... (text cut to T-2 tokens), with its label; past the last
    example, example i mod n with label -1, so evaluation batches keep their size on every rank."""
    n, sp = len(c["ends"]), special_ids(c["base"])
    label = int(c["labels"][i]) if i < n else -1
    s, e = int(c["starts"][i % n]), int(c["ends"][i % n])
    body = c["data"][s:min(e, s + T - 2)]
    x = np.full(T, sp.pad, np.int64)
    x[0], x[1:1 + len(body)], x[1 + len(body)] = sp.cls, body, sp.sep
    return dict(idx=x, token_type_ids=np.zeros(T, np.int64), attn_mask=x != sp.pad, labels=np.int64(label))


@torch.no_grad()
def show_label(net, b, batch, tok, meta):
    logits, _ = net(**b)  # (1, n_labels)
    return (f"{tok.decode(batch['idx'][0].tolist())[:80]!r} -> {meta['labels'][logits.argmax().item()]} "
            f"(true: {meta['labels'][int(batch['labels'][0])]})")


OBJECTIVES["classify"] = Objective(
    head="classify", decoder=False, extra_tokens=N_SPECIAL, corpus="stdlib_modules", model="bert-tiny",
    open=labelled_corpus, fit=fit_examples, batch=classify_batch, show=show_label, metrics=("loss", "acc"),
    metric_sums=lambda logits, loss, batch: torch.stack([v.double() for v in ce_acc(logits, batch["labels"])]),
    examples=True)

# -----------------------------------------------------------------------------
# the encoder-decoder objectives (T5): span corruption and source/target pairs

N_SENTINEL = 100  # T5's extra_ids: sentinel k is base vocab_size + N_SPECIAL + k
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # span corruption: the share of noise tokens, the mean length of a noise span


def _noise_counts(n):
    """T5's numbers of noise tokens and of noise spans in n tokens."""
    noise = min(max(round(n * NOISE_DENSITY), 1), n - 1)
    return noise, max(round(noise / MEAN_SPAN), 1)


def span_lengths(T):
    """(raw, targets): the longest window whose corrupted input (the non-noise tokens, a sentinel per span and
    EOS) is T tokens, and the length of its targets (a sentinel per span, the noise tokens and EOS), as T5's
    compute_input_and_target_lengths. The input grows by at most one token per raw token, so it is T exactly."""
    def lengths(n):
        noise, spans = _noise_counts(n)
        return n - noise + spans + 1, noise + spans + 1
    if T < 10:  # below this even the shortest window corrupts into more than T tokens
        raise UserError(f"seq_len={T} is too short for span corruption: use seq_len >= 10")
    n = T
    while lengths(n + 1)[0] <= T:
        n += 1
    if _noise_counts(n)[1] > N_SENTINEL:
        raise UserError(f"seq_len={T} makes {_noise_counts(n)[1]} noise spans, more than the {N_SENTINEL} sentinels: "
                        f"lower seq_len (at most 1809)")
    return n, lengths(n)[1]


def noise_mask(n, rng):
    """T5's random_spans_noise_mask: (n,) bool, True at the noise tokens. The noise and the non-noise tokens
    are each cut into the same number of non-empty runs at random, and the runs alternate, non-noise first."""
    noise, spans = _noise_counts(n)

    def runs(items):  # items cut into `spans` runs: spans - 1 cut points drawn from the items - 1 places
        first = np.r_[0, rng.permutation(np.arange(items - 1) < spans - 1)]
        return np.bincount(np.cumsum(first), minlength=spans)
    return np.repeat(np.arange(2 * spans) % 2 == 1, np.stack([runs(n - noise), runs(noise)], 1).ravel())


def span_corrupt(x, mask, base, eos):
    """T5's span corruption of tokens x (n,) by a noise mask (n,): (inputs, targets). Inputs: x with its k-th
    noise span replaced by sentinel k, then EOS; targets: each sentinel k followed by the span it replaced,
    then EOS (T5's noise_span_to_unique_sentinel on the mask and on its complement)."""
    def runs_to_sentinels(m):  # the k-th run of True in m becomes sentinel k
        prev = np.r_[False, m[:-1]]
        first = m & ~prev
        return np.where(first, base + N_SPECIAL + np.cumsum(first) - 1, x)[~(m & prev)]
    return np.r_[runs_to_sentinels(mask), eos], np.r_[runs_to_sentinels(~mask), eos]


def span_uncorrupt(inputs, targets, base):
    """The tokens that span_corrupt started from: each sentinel of the inputs replaced by what follows the
    same sentinel in the targets (the EOS ending each dropped). A list of ids."""
    is_sentinel = lambda t: 0 <= t - base - N_SPECIAL < N_SENTINEL
    spans, span = {}, []  # (tokens before the first sentinel, none in a well-formed target, are dropped)
    for t in targets[:-1]:
        if is_sentinel(t):
            span = spans.setdefault(int(t), [])
        else:
            span.append(int(t))
    return [u for t in inputs[:-1] for u in (spans.get(int(t), []) if is_sentinel(t) else [int(t)])]


def decoder_rows(y, c):
    """Teacher forcing for a target y (ending in EOS): the decoder reads [PAD] (the start) + y[:-1] and
    predicts y; padded to D with [PAD] and -1 (ignored)."""
    pad = special_ids(c["base"]).pad
    dec, targets = np.full(c["D"], pad, np.int64), np.full(c["D"], -1, np.int64)
    dec[1:len(y)], targets[:len(y)] = y[:-1], y
    return dict(dec_idx=dec, targets=targets)


def fit_span(c, T, cfg):
    """Windows of `raw` tokens whose corruption is T encoder tokens, and D decoder tokens (dec_len, or if 0:
    T5's target length; with span_targets='whole', the window and EOS)."""
    raw, need = span_lengths(T)
    whole = cfg.get("span_targets") == "whole"  # (a config saved before this key: T5's)
    need = raw + 1 if whole else need
    if len(c["data"]) < raw:
        raise UserError(f"{c['name']} has {len(c['data'])} tokens, fewer than the {raw} that span corruption turns "
                        f"into seq_len={T}: lower seq_len or use more data")
    if cfg["dec_len"] and cfg["dec_len"] < need:
        raise UserError(f"dec_len={cfg['dec_len']} is shorter than the {need} target tokens of span corruption at "
                        f"seq_len={T}: raise it, or 0 to derive it")
    return dict(c, T=T, D=cfg["dec_len"] or need, raw=raw, whole=whole)


def span_batch(c, rows, n_rows, seed=None, step=None):
    """Training: a window drawn per row; validation: row i is the i-th of n_rows evenly spaced windows, its noise
    drawn with seed i. Each: idx, attn_mask (B, T), dec_idx, targets (B, D). The decoder writes T5's targets, or
    with c["whole"] the whole window and EOS (it copies what the encoder reads and fills in the holes, so
    pretraining must teach it to read the encoder)."""
    out, last = [], len(c["data"]) - c["raw"]
    for i in rows:
        rng = np.random.default_rng((seed, step, i) if seed is not None else (i,))
        start = int(rng.integers(last + 1)) if seed is not None else i * last // max(n_rows - 1, 1)
        x = np.asarray(c["data"][start:start + c["raw"]], dtype=np.int64)
        inputs, targets = span_corrupt(x, noise_mask(len(x), rng), c["base"], c["sep_id"])
        targets = np.r_[x, c["sep_id"]] if c["whole"] else targets
        out.append(dict(idx=inputs, attn_mask=np.ones(c["T"], bool), **decoder_rows(targets, c)))
    return stack(out)


@torch.no_grad()
def show_target(net, b, batch, tok, meta):
    """The decoder's greedy output for the row's source."""
    base = meta["vocab_size"]
    out = net.generate(b["idx"], SAMPLE_TOKENS, temperature=0.0, attn_mask=b["attn_mask"],
                       start_id=special_ids(base).pad, stop_id=meta["sep_id"])[0].tolist()
    source = show(tok, batch["idx"][0][batch["attn_mask"][0]].tolist(), base)
    return f"{source[-120:]!r} -> {show(tok, out, base)!r}"


OBJECTIVES["span"] = Objective(
    head="lm", decoder=True, extra_tokens=N_SPECIAL + N_SENTINEL, corpus="pystdlib", model="t5-tiny",
    open=lambda data_dir, split, meta: dict(data=load_split(data_dir, split, meta), base=meta["vocab_size"],
                                            sep_id=meta["sep_id"], name=f"{data_dir}/{split}"),
    fit=fit_span, batch=span_batch, show=show_target)


def pairs_corpus(data_dir, split, meta):
    """One split of a seq2seq corpus: documents(), example k being documents 2k (source) and 2k + 1 (target)."""
    if not meta.get("seq2seq"):
        raise UserError(f"{data_dir} is not a seq2seq corpus (meta.json has no 'seq2seq'); make one with: "
                        f"python prepare.py --seq2seq --name=NAME --input=PAIRS.jsonl")
    c = documents(data_dir, split, meta)
    if len(c["ends"]) % 2:
        raise UserError(f"{c['name']} holds {len(c['ends'])} documents, not (source, target) pairs; "
                        f"re-run prepare.py --seq2seq")
    return c


def fit_pairs(c, T, cfg):
    """Sources of T tokens, targets of D = dec_len (0: T); training draws only from label_subset (label_fraction)."""
    return dict(c, T=T, D=cfg["dec_len"] or T, subset=label_subset(len(c["ends"]) // 2, cfg["label_fraction"],
                                                                     cfg["seed"]))


def seq2seq_example(c, k):
    """Example k's (source, target) token arrays."""
    return tuple(c["data"][c["starts"][2 * k + j]:c["ends"][2 * k + j]] for j in (0, 1))


def seq2seq_batch(c, rows, n_rows, seed=None, step=None):
    """Training: an example drawn per row from c["subset"]; validation: example i (mod their number: a row always
    has targets, so no batch averages a loss over nothing)."""
    pick, n = c["subset"], len(c["ends"]) // 2
    return stack([seq2seq_row(c, int(pick[np.random.default_rng((seed, step, i)).integers(len(pick))])
                              if seed is not None else i % n) for i in rows])


def seq2seq_row(c, k):
    """Example k: source + EOS padded with [PAD] to T (attn_mask True at the real tokens), target + EOS for the
    decoder. A longer source or target is cut to fit (its EOS kept), as T5 trims before appending EOS."""
    src, tgt = seq2seq_example(c, k)
    src, tgt = np.r_[src[:c["T"] - 1], c["sep_id"]], np.r_[tgt[:c["D"] - 1], c["sep_id"]]
    x = np.full(c["T"], special_ids(c["base"]).pad, np.int64)
    x[:len(src)] = src
    return dict(idx=x, attn_mask=np.arange(c["T"]) < len(src), **decoder_rows(tgt.astype(np.int64), c))


OBJECTIVES["seq2seq"] = Objective(
    head="lm", decoder=True, extra_tokens=N_SPECIAL + N_SENTINEL, corpus="stdlib_params", model="t5-tiny",
    open=pairs_corpus, fit=fit_pairs, batch=seq2seq_batch, show=show_target, examples=True)

# -----------------------------------------------------------------------------
# fine-tuning a pretrained encoder onto another head

def adapt_heads(state, model, seed=0):
    """A checkpoint's state dict made to fit `model` when only the heads differ (an MLM+NSP encoder
    fine-tuned as a classifier): head weights the model lacks are dropped, heads the checkpoint lacks get
    their fresh init. Everything else is left as it is, for the strict check that follows."""
    own = model.state_dict()
    out = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    for k, v in own.items():
        if k not in state and k.startswith(HEAD_PREFIXES):
            out[k] = model.init_tensor(k, v.shape, seed)
    return out
