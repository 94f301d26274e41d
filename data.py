"""
Reading prepared corpora, and the batch builders of every objective: next-token windows (clm), MLM + NSP
pairs (mlm_nsp), labelled rows (classify), and for the encoder-decoder T5's span corruption (span) and
source/target pairs (seq2seq). prepare.py writes the format below; train.py and bench.py read it only
through this file.

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

Tokenizers: "bytes" is UTF-8 bytes 0..255 with separator 256 (vocab 257), and needs
nothing. Any tiktoken encoding (gpt2, cl100k_base, o200k_base, ...) uses its
<|endoftext|> token as separator; tiktoken downloads its files on first use, or
reads them from the folder in TIKTOKEN_CACHE_DIR. A tiktoken BPE file's separator is
the id after its last rank; a tokenizer.json's is the eos_token of the
tokenizer_config.json beside it (else the first of prepare.SEP_NAMES it has).

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
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, atomic_write
from model import HEAD_PREFIXES, mix_seed, mlm_positions
from prepare import get_tokenizer_from_meta, text_bytes

# -----------------------------------------------------------------------------
# reading a prepared corpus

def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{path} not found: {data_dir} is not a prepared corpus; make one with: "
                                f"python prepare.py --input=YOUR_TEXT_FILES --name={Path(data_dir).name}")
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("tokenizer", "vocab_size", "dtype", "sep_id", "train_tokens", "val_tokens") if k not in meta]
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
            meta[f"{split}_bytes"] = text_bytes(Path(data_dir) / f"{split}.bin", meta["dtype"], get_tokenizer_from_meta(meta))
        except UserError:
            pass
    try:
        atomic_write(Path(data_dir) / "meta.json", json.dumps(meta, indent=2) + "\n")
    except OSError:  # a read-only corpus: computed again next time
        pass
    return meta


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



def open_splits(data_dir, meta, objective):
    """(train, val) as the batch builders take them: the token arrays for clm, else each split indexed by
    encoder_corpus, or by t5_corpus for span and seq2seq (whose rows fit_splits then sizes)."""
    if objective == "clm":
        return load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)
    corpus = t5_corpus if objective in T5_OBJECTIVES else encoder_corpus
    return tuple(corpus(data_dir, s, meta, objective) for s in ("train", "val"))


def fit_splits(splits, objective, T, dec_len=0, label_fraction=1.0, seed=0):
    """The splits, for rows of T tokens: span and seq2seq splits sized and checked by t5_fit (dec_len: the
    decoder's length, 0 derives it); classify's training split drawing from label_subset only; the others as they are."""
    if objective == "classify":
        return dict(splits[0], subset=label_subset(len(splits[0]["ends"]), label_fraction, seed)), splits[1]
    return tuple(t5_fit(c, objective, T, dec_len) for c in splits) if objective in T5_OBJECTIVES else splits


def label_subset(n, fraction, seed):
    """The labelled training examples a classify run draws from: the first ceil(fraction * n) of a permutation
    of the n seeded by `seed` (all n in order at 1.0). A smaller fraction's subset lies inside a larger one's
    (same seed), and the subset is a function of its arguments, so resume needs no state."""
    if fraction >= 1.0:
        return np.arange(n)
    k = math.ceil(round(fraction * n, 6))  # (round: 0.1 * 4030 is 403.00000000000006, which is 403 examples)
    return np.random.default_rng((seed, 0x1abe1)).permutation(n)[:k]


def train_batch(split, objective, T, rows, n_rows, seed, step):
    """Rows `rows` (a range of global row numbers) of training step `step`, whose global batch has n_rows."""
    if objective in T5_OBJECTIVES:  # (T is the split's own, set by fit_splits)
        return t5_batch(split, objective, rows, n_rows, seed, step)
    if objective != "clm":
        return encoder_batch(split, T, objective, rows, seed, step)
    g = torch.Generator().manual_seed(mix_seed(seed, step))
    starts = torch.randint(len(split) - T - 1, (n_rows,), generator=g)
    return windows(split, starts[rows.start:rows.stop].tolist(), T)


def eval_batch(split, objective, T, rows, n_rows):
    """Rows `rows` of the fixed validation set of n_rows rows: for clm, n_rows evenly spaced windows."""
    if objective in T5_OBJECTIVES:
        return t5_batch(split, objective, rows, n_rows)
    if objective != "clm":
        return encoder_batch(split, T, objective, rows)
    starts = np.linspace(0, len(split) - T - 1, n_rows).astype(np.int64).tolist()
    return windows(split, starts[rows.start:rows.stop], T)


def windows(data, starts, T):
    """Next-token rows: data[s:s+T] as inputs, data[s+1:s+T+1] as targets, (B, T) each."""
    x = np.stack([data[s:s + T] for s in starts]).astype(np.int64)
    y = np.stack([data[s + 1:s + T + 1] for s in starts]).astype(np.int64)
    return {"idx": x, "targets": y}


def to_device(batch, device):
    """A batch of numpy arrays as tensors on `device`: from pinned memory without blocking on CUDA."""
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()}

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
    return "".join(tok.decode(list(g)) if text else "".join(f"<{i - base - N_SPECIAL}>" for i in g if i >= base + N_SPECIAL)
                   for text, g in runs)


def newline_tokens(meta):
    """Boolean table over the base vocabulary: does the token's text hold a newline (a line boundary)."""
    if meta["tokenizer"] == "bytes":
        return np.arange(meta["vocab_size"]) == 10
    tok = get_tokenizer_from_meta(meta)
    return np.array(["\n" in tok.decode([i]) for i in range(meta["vocab_size"])])


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


def encoder_corpus(data_dir, split, meta, objective):
    """One split, indexed once for the batch builders: documents(), newline positions (for cutting pairs at
    line boundaries) and, if labelled, the labels."""
    c = documents(data_dir, split, meta)
    if objective == "classify":
        if "labels" not in meta:
            raise UserError(f"{data_dir} has no labels (meta.json 'labels'); objective='classify' needs a labelled "
                             f"corpus: prepare.py --classify --name=NAME --input=FILE.jsonl")
        c["labels"] = np.load(Path(data_dir) / f"{split}_labels.npy")
        if len(c["labels"]) != len(c["ends"]):
            raise UserError(f"{data_dir}: {len(c['labels'])} {split} labels for {len(c['ends'])} documents; re-run prepare.py")
        return c
    table = newline_tokens(meta)
    c["nl"] = _positions(c["data"], lambda a: table[a])
    if ((c["ends"] - c["starts"]) >= 2).sum() < 2:
        raise UserError(f"{c['name']}: next sentence prediction needs at least two documents of 2+ tokens")
    return c


def encoder_batch(c, T, objective, index, seed=None, step=None):
    """Rows for the global row numbers `index`, as a dict of (B, T) arrays (labels (B,)). Training (seed
    and step given): each row drawn by a generator seeded with (seed, step, row). Evaluation: row i is
    the i-th fixed validation pair, or the i-th labelled example (label -1, ignored, past the end)."""
    rows = []
    for i in index:
        if objective == "classify":  # training: one of label_subset's examples (fit_splits), all of them by default
            pick = c.get("subset", np.arange(len(c["ends"])))
            rows.append(classify_row(c, T, int(pick[np.random.default_rng((seed, step, i)).integers(len(pick))])
                                     if seed is not None else i))
        else:
            rows.append(mlm_nsp_pair(c, T, np.random.default_rng((seed, step, i) if seed is not None else (i,))))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


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

# -----------------------------------------------------------------------------
# the encoder-decoder objectives (T5): span corruption and source/target pairs

T5_OBJECTIVES = ("span", "seq2seq")
N_SENTINEL = 100  # T5's extra_ids: sentinel k is base vocab_size + N_SPECIAL + k
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # span corruption: the share of noise tokens, the mean length of a noise span


def extra_tokens(objective):
    """How many ids an objective adds after the base vocabulary: the specials, and for T5 the sentinels."""
    return 0 if objective == "clm" else N_SPECIAL + N_SENTINEL * (objective in T5_OBJECTIVES)


def check_model(objective, n_dec_layer, dec_len):
    """The objective's needs of the model config, as a UserError: the T5 objectives need a decoder, the
    others none; dec_len is the decoder's."""
    t5 = objective in T5_OBJECTIVES
    if t5 and not n_dec_layer:
        raise UserError(f"objective={objective!r} needs an encoder-decoder model (n_dec_layer > 0): use model='t5-tiny', "
                        f"'t5-small' or 't5-base'")
    if n_dec_layer and not t5:
        raise UserError(f"an encoder-decoder model (n_dec_layer={n_dec_layer}) trains with objective='span' or 'seq2seq', "
                        f"not {objective!r}")
    if dec_len and not t5:
        raise UserError(f"dec_len={dec_len} is the decoder's length, which objective={objective!r} has not: drop it")


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


def t5_corpus(data_dir, split, meta, objective):
    """One split for the encoder-decoder. span: the tokens, cut into windows anywhere (as clm's, across
    documents); seq2seq: the documents indexed, example k being documents 2k and 2k + 1."""
    if objective == "span":
        return dict(data=load_split(data_dir, split, meta), base=meta["vocab_size"], sep_id=meta["sep_id"],
                    name=f"{data_dir}/{split}")
    if not meta.get("seq2seq"):
        raise UserError(f"{data_dir} is not a seq2seq corpus (meta.json has no 'seq2seq'); make one with: "
                        f"python prepare.py --seq2seq --name=NAME --input=PAIRS.jsonl")
    c = documents(data_dir, split, meta)
    if len(c["ends"]) % 2:
        raise UserError(f"{c['name']} holds {len(c['ends'])} documents, not (source, target) pairs; re-run prepare.py --seq2seq")
    return c


def t5_fit(c, objective, T, dec_len=0):
    """A t5_corpus split for rows of T encoder tokens and D decoder tokens (dec_len, or if 0: T5's target
    length for span, T for seq2seq), checked; span's windows are `raw` tokens long."""
    raw, need = span_lengths(T) if objective == "span" else (0, 1)
    if len(c["data"]) < raw:
        raise UserError(f"{c['name']} has {len(c['data'])} tokens, fewer than the {raw} that span corruption turns "
                        f"into seq_len={T}: lower seq_len or use more data")
    D = dec_len or (need if objective == "span" else T)
    if D < need:
        raise UserError(f"dec_len={dec_len} is shorter than the {need} target tokens of span corruption at seq_len={T}: "
                        f"raise it, or 0 to derive it")
    return dict(c, T=T, D=D, raw=raw)


def t5_batch(c, objective, index, n_rows, seed=None, step=None):
    """Rows for the global row numbers `index`: idx, attn_mask (B, T), dec_idx, targets (B, D). Training (seed
    and step given): each row drawn by a generator seeded with (seed, step, row). Evaluation: row i is the
    i-th of n_rows evenly spaced windows, its noise drawn with seed i, or example i (mod their number: a row
    always has targets, so no batch averages a loss over nothing)."""
    rows = []
    for i in index:
        rng = np.random.default_rng((seed, step, i) if seed is not None else (i,))
        if objective == "span":
            last = len(c["data"]) - c["raw"]
            start = int(rng.integers(last + 1)) if seed is not None else i * last // max(n_rows - 1, 1)
            rows.append(span_row(c, start, rng))
        else:
            n = len(c["ends"]) // 2
            rows.append(seq2seq_row(c, int(rng.integers(n)) if seed is not None else i % n))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def decoder_rows(y, c):
    """Teacher forcing for a target y (ending in EOS): the decoder reads [PAD] (the start) + y[:-1] and
    predicts y; padded to D with [PAD] and -1 (ignored)."""
    pad = special_ids(c["base"]).pad
    dec, targets = np.full(c["D"], pad, np.int64), np.full(c["D"], -1, np.int64)
    dec[1:len(y)], targets[:len(y)] = y[:-1], y
    return dict(dec_idx=dec, targets=targets)


def span_row(c, start, rng):
    """The window at `start`, span-corrupted: T encoder tokens, no padding."""
    x = np.asarray(c["data"][start:start + c["raw"]], dtype=np.int64)
    inputs, targets = span_corrupt(x, noise_mask(len(x), rng), c["base"], c["sep_id"])
    return dict(idx=inputs, attn_mask=np.ones(c["T"], bool), **decoder_rows(targets, c))


def seq2seq_example(c, k):
    """Example k's (source, target) token arrays."""
    return tuple(c["data"][c["starts"][2 * k + j]:c["ends"][2 * k + j]] for j in (0, 1))


def seq2seq_row(c, k):
    """Example k: source + EOS padded with [PAD] to T (attn_mask True at the real tokens), target + EOS for the
    decoder. A longer source or target is cut to fit (its EOS kept), as T5 trims before appending EOS."""
    src, tgt = seq2seq_example(c, k)
    src, tgt = np.r_[src[:c["T"] - 1], c["sep_id"]], np.r_[tgt[:c["D"] - 1], c["sep_id"]]
    x = np.full(c["T"], special_ids(c["base"]).pad, np.int64)
    x[:len(src)] = src
    return dict(idx=x, attn_mask=np.arange(c["T"]) < len(src), **decoder_rows(tgt.astype(np.int64), c))


# -----------------------------------------------------------------------------
# metrics per head, and fitting a pretrained encoder to another head (fine-tuning)

METRICS = {"lm": ("loss",), "mlm_nsp": ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"), "classify": ("loss", "acc")}


@torch.no_grad()
def metric_sums(head, logits, loss, batch):
    """(sum, count) of each METRICS[head] entry over one batch, flattened to a float64 vector: sums add up
    across micro-batches, evaluation batches and ranks (one all_reduce), and metrics_from_sums() divides at the end."""
    if head == "lm":
        n = (batch["targets"] != -1).sum()
        return torch.stack([loss.detach().double() * n, n.double()])
    def ce_acc(lg, y):  # summed cross-entropy, correct predictions and count over the labels != -1
        lg, y = lg.float().flatten(0, -2), y.flatten()  # masked sums, not lg[y != -1]: fixed shapes, no sync
        n = (y != -1).sum()
        ce = F.cross_entropy(lg, y, ignore_index=-1, reduction="none")  # 0 where y == -1
        return [ce.sum(), n, (lg.argmax(-1) == y).sum(), n]  # argmax is never -1
    if head == "classify":
        parts = ce_acc(logits, batch["labels"])
    else:  # the MLM logits are at mlm_positions: gather the targets the same way
        t = batch["targets"]
        parts = ce_acc(logits[0], t.gather(1, mlm_positions(t))) + ce_acc(logits[1], batch["labels"])
    return torch.stack([v.double() for v in parts])


def metrics_from_sums(head, sums):
    """{name: mean} from metric_sums vectors added up; "loss" is the total (for mlm_nsp L_MLM + L_NSP)."""
    sums = sums.tolist() if torch.is_tensor(sums) else sums  # train.py reads them to the host itself
    out = {name: sums[2 * i] / max(sums[2 * i + 1], 1) for i, name in enumerate(METRICS[head])}
    out["loss"] = sum(v for k, v in out.items() if k.endswith("loss"))
    return out


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
