"""
Reading prepared corpora, and the batch builders of every objective: next-token windows (clm), MLM + NSP
pairs (mlm_nsp) and labelled rows (classify). prepare.py writes the format below; train.py and bench.py
read it only through this file.

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

The encoder objectives (MLM + NSP, classification) add 4 special tokens after the base
vocabulary, nowhere in the files: [CLS] [SEP] [MASK] [PAD] = vocab_size + 0, 1, 2, 3.
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
import json
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
    """(train, val) as the batch builders take them: the token arrays for clm, else each split indexed
    by encoder_corpus."""
    if objective == "clm":
        return load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)
    return tuple(encoder_corpus(data_dir, s, meta, objective) for s in ("train", "val"))


def train_batch(split, objective, T, rows, n_rows, seed, step):
    """Rows `rows` (a range of global row numbers) of training step `step`, whose global batch has n_rows."""
    if objective != "clm":
        return encoder_batch(split, T, objective, rows, seed, step)
    g = torch.Generator().manual_seed(mix_seed(seed, step))
    starts = torch.randint(len(split) - T - 1, (n_rows,), generator=g)
    return windows(split, starts[rows.start:rows.stop].tolist(), T)


def eval_batch(split, objective, T, rows, n_rows):
    """Rows `rows` of the fixed validation set of n_rows rows: for clm, n_rows evenly spaced windows."""
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


def encoder_corpus(data_dir, split, meta, objective):
    """One split, indexed once for the batch builders: document [start, end) (end is the separator's
    position), newline positions (for cutting pairs at line boundaries) and, if labelled, the labels."""
    data = load_split(data_dir, split, meta)
    ends = _positions(data, lambda a: a == meta["sep_id"])
    c = dict(data=data, starts=np.concatenate(([0], ends[:-1] + 1)), ends=ends, base=meta["vocab_size"],
             sep_id=meta["sep_id"], name=f"{data_dir}/{split}")
    if not len(ends):  # an evaluation over nothing would report a loss of 0
        raise UserError(f"{data_dir}: the {split} split holds no documents; re-run prepare.py on more examples")
    if objective == "classify":
        if "labels" not in meta:
            raise UserError(f"{data_dir} has no labels (meta.json 'labels'); objective='classify' needs a labelled "
                             f"corpus: prepare.py --classify --name=NAME --input=FILE.jsonl")
        c["labels"] = np.load(Path(data_dir) / f"{split}_labels.npy")
        if len(c["labels"]) != len(ends):
            raise UserError(f"{data_dir}: {len(c['labels'])} {split} labels for {len(ends)} documents; re-run prepare.py")
        return c
    table = newline_tokens(meta)
    c["nl"] = _positions(data, lambda a: table[a])
    if ((c["ends"] - c["starts"]) >= 2).sum() < 2:
        raise UserError(f"{c['name']}: next sentence prediction needs at least two documents of 2+ tokens")
    return c


def encoder_batch(c, T, objective, index, seed=None, step=None):
    """Rows for the global row numbers `index`, as a dict of (B, T) arrays (labels (B,)). Training (seed
    and step given): each row drawn by a generator seeded with (seed, step, row). Evaluation: row i is
    the i-th fixed validation pair, or the i-th labelled example (label -1, ignored, past the end)."""
    rows = []
    for i in index:
        if objective == "classify":
            rows.append(classify_row(c, T, int(np.random.default_rng((seed, step, i)).integers(len(c["ends"])))
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
