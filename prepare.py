"""
Turn text into token files that train.py can read.

    python prepare.py                     # built-in corpus: Python stdlib, bytes tokenizer
    python prepare.py --name=notes --input=notes/ --input=more.jsonl --tokenizer=gpt2

Data format (the one place it is written down)
----------------------------------------------
A prepared corpus is a folder data/NAME/ holding three files:

  train.bin, val.bin  flat arrays of token ids in native byte order, uint16 when
                      vocab_size <= 65536, else uint32. Documents are concatenated
                      and every document is FOLLOWED by the separator id sep_id,
                      so each file is a sequence of separator-terminated documents
                      (number of documents == number of sep_id tokens).
  meta.json           tokenizer     tokenizer name ("bytes", or a tiktoken encoding like "gpt2")
                      vocab_size    base vocabulary size, separator included
                      dtype         "uint16" or "uint32", the dtype of both .bin files
                      sep_id        the document separator id
                      train_tokens, val_tokens   number of ids in train.bin / val.bin
                      train_docs, val_docs       number of documents in each
                      source        short description of the inputs

meta.json is written last: a folder without it is not a finished corpus.
Documents are numbered in input order; document i goes to val.bin when
i % 20 == 0 and to train.bin otherwise.

Labelled corpora (for classification fine-tuning; prepare.py --classify, or the built-in
"stdlib_modules") are the same three files, where each document is one example, plus
  meta.json           labels        the class names; class i is labels[i]
  train_labels.npy, val_labels.npy  int64 class id of each document, in order

The encoder objectives (MLM + NSP, classification) add 4 special tokens after the base
vocabulary, nowhere in the files: [CLS] [SEP] [MASK] [PAD] = vocab_size + 0, 1, 2, 3.

Tokenizers: "bytes" is UTF-8 bytes 0..255 with separator 256 (vocab 257), and needs
nothing. Any tiktoken encoding (gpt2, cl100k_base, o200k_base, ...) uses its
<|endoftext|> token as separator; tiktoken downloads its files on first use, or
reads them from the folder in TIKTOKEN_CACHE_DIR.
"""

import argparse
import glob
import json
import multiprocessing
import os
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

VAL_EVERY = 20  # document i goes to validation when i % VAL_EVERY == 0; fixed, never change
PYSTDLIB_EXCLUDE = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
# extensions picked up when an --input is a directory (files named directly are always taken)
TEXT_EXTS = {".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp",
             ".js", ".ts", ".java", ".go", ".rs", ".sh", ".html", ".css", ".toml", ".yaml", ".yml",
             ".jsonl"}

# -----------------------------------------------------------------------------
# tokenizers

def get_tokenizer(name):
    """A tokenizer: .name, .encode(str) -> list[int], .decode(list[int]) -> str, .vocab_size, .sep_id."""
    if name == "bytes":
        return SimpleNamespace(
            name="bytes", vocab_size=257, sep_id=256,
            encode=lambda s: list(s.encode("utf-8")),
            # ids > 255 (the separator, or padding ids a model may sample) are not text
            decode=lambda ids: bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace"))
    try:
        import tiktoken  # imported only here, so the bytes tokenizer works without it
    except ImportError:
        raise RuntimeError(f"tokenizer {name!r} needs tiktoken (pip install tiktoken); "
                           "--tokenizer=bytes needs nothing") from None
    if name not in tiktoken.list_encoding_names():
        valid = ", ".join(["bytes"] + tiktoken.list_encoding_names())
        raise ValueError(f"unknown tokenizer {name!r}; valid names: {valid}")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # no network, a proxy, a corrupt download: all look alike to the user
        cause = f"{type(e).__name__}: {str(e)}".splitlines()[0]
        cause = cause if len(cause) < 100 else cause[:99] + "…"
        raise RuntimeError(
            f"tiktoken encoding {name!r} could not be loaded: tiktoken could not download its "
            f"files ({cause}). Fix: set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached "
            f"files (or run once with internet access to fill the cache), or use "
            f"--tokenizer=bytes, which works offline.") from None

    def decode(ids):
        ids = [i for i in ids if 0 <= i < enc.n_vocab]
        try:
            return enc.decode(ids, errors="replace")
        except KeyError:  # some encodings have holes below n_vocab; drop just those ids
            ok = []
            for i in ids:
                try:
                    enc.decode_single_token_bytes(i)
                    ok.append(i)
                except KeyError:
                    pass
            return enc.decode(ok, errors="replace")

    # encode_ordinary: text that happens to contain "<|endoftext|>" stays plain text
    return SimpleNamespace(name=name, vocab_size=enc.n_vocab, sep_id=enc.eot_token,
                           encode=enc.encode_ordinary, decode=decode)


def dtype_for_vocab(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32

# -----------------------------------------------------------------------------
# reading a prepared corpus

def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared corpus; make one with: "
                                f"python prepare.py --input=YOUR_TEXT_FILES --name={Path(data_dir).name}")
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("tokenizer", "vocab_size", "dtype", "sep_id", "train_tokens", "val_tokens") if k not in meta]
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path} is not valid meta.json ({e}); re-run prepare.py") from e
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run prepare.py")
    return meta


def get_tokenizer_from_meta(meta):
    """The tokenizer a corpus was built with; meta is a meta.json dict or a corpus folder."""
    if not isinstance(meta, dict):
        meta = load_meta(meta)
    tok = get_tokenizer(meta["tokenizer"])
    if (tok.vocab_size, tok.sep_id) != (meta["vocab_size"], meta["sep_id"]):
        raise RuntimeError(f"tokenizer {tok.name!r} now has vocab_size={tok.vocab_size} "
                           f"sep_id={tok.sep_id}, but the corpus recorded "
                           f"{meta['vocab_size']} and {meta['sep_id']}; re-run prepare.py")
    return tok


def load_split(data_dir, split, meta=None):
    """train.bin or val.bin as a read-only memmap, checked against meta.json (split is "train" or "val")."""
    meta = meta or load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; re-run prepare.py --name={Path(data_dir).name} ...")
    size, n = path.stat().st_size, meta[f"{split}_tokens"]
    expect = n * np.dtype(meta["dtype"]).itemsize
    if size != expect:
        raise ValueError(f"{path} holds {size} bytes but meta.json says {n} {meta['dtype']} tokens "
                         f"({expect} bytes): the file is truncated or stale; re-run prepare.py")
    if size == 0:
        raise ValueError(f"{path} is empty; re-run prepare.py on more text")
    return np.memmap(path, dtype=meta["dtype"], mode="r")

# -----------------------------------------------------------------------------
# finding the documents

def pystdlib_files():
    """[(relpath, abspath)] of the stdlib's .py files, sorted by relpath: the pystdlib documents."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(root).as_posix(), str(p)) for p in root.rglob("*.py")
             if p.is_file() and not PYSTDLIB_EXCLUDE & set(p.relative_to(root).parts)]
    return sorted(files)


def expand_inputs(inputs):
    """Files, directories (walked for TEXT_EXTS files) and globs -> sorted list of file paths."""
    files = set()
    for inp in inputs:
        matches = [inp] if os.path.exists(inp) else sorted(glob.glob(inp, recursive=True))
        if not matches:
            raise FileNotFoundError(f"input {inp!r} matches no file or directory")
        for m in matches:
            if os.path.isdir(m):
                found = [p for p in Path(m).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTS
                         and not any(part.startswith(".") for part in p.relative_to(m).parts)]
                if not found:
                    raise FileNotFoundError(f"input directory {inp!r} holds no text files "
                                            f"({' '.join(sorted(TEXT_EXTS))})")
                files.update(str(p.resolve()) for p in found)
            else:
                files.add(str(Path(m).resolve()))
    return sorted(files, key=lambda f: Path(f).as_posix())


def iter_documents(files):
    """Yield (text, input_bytes) one document at a time: a whole file, or one line of a .jsonl."""
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{lineno}: expected a JSON object with a 'text' string")
                    yield text, len(line)
        else:
            data = Path(f).read_bytes()
            yield data.decode("utf-8", errors="replace"), len(data)

# -----------------------------------------------------------------------------
# tokenizing, in worker processes when it pays

_tok = None  # each worker builds its own tokenizer once: the lambdas inside don't pickle

def _init_worker(tokenizer_name):
    global _tok
    _tok = get_tokenizer(tokenizer_name)

def _encode(doc):
    text, nbytes = doc
    ids = np.array(_tok.encode(text) + [_tok.sep_id], dtype=dtype_for_vocab(_tok.vocab_size))
    return ids, nbytes


def prepare(name="pystdlib", inputs=None, tokenizer="bytes", out_dir="data", workers=None, quiet=False):
    """Build data/NAME/{train.bin,val.bin,meta.json} (format: see the module docstring); returns the folder."""
    t0 = time.time()
    if name == CLASSIFY_DEMO and not inputs:
        return prepare_classify(name, None, tokenizer, out_dir, quiet)
    if inputs:
        if name == "pystdlib":
            raise ValueError("'pystdlib' is the built-in corpus; give your inputs another --name")
        files = expand_inputs(inputs)
        source = f"{len(files)} files from " + ", ".join(inputs)
    elif name == "pystdlib":
        files = [f for _, f in pystdlib_files()]
        source = f"{len(files)} .py files of the Python {sys.version.split()[0]} stdlib " \
                 f"({sysconfig.get_paths()['stdlib']}), without tests/idlelib"
    else:
        raise ValueError(f"no corpus {name!r}: the only built-in corpus is 'pystdlib'; "
                         f"build {name!r} with: python prepare.py --name={name} --input=PATH ...")
    tok = get_tokenizer(tokenizer)  # fail early (e.g. tiktoken offline) before writing anything
    dtype = dtype_for_vocab(tok.vocab_size)
    total_bytes = sum(os.path.getsize(f) for f in files)
    if workers is None:  # processes only pay off for real BPE work on a sizeable corpus
        big = tokenizer != "bytes" and total_bytes > (4 << 20)
        workers = min(os.cpu_count() or 1, 8) if big else 1

    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # the old corpus is no longer complete
    tmp = {s: folder / f"{s}.bin.tmp{os.getpid()}" for s in ("train", "val")}
    ntok, ndocs = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    done_bytes, last_print, pool = 0, time.time(), None
    try:
        with open(tmp["train"], "wb", buffering=1 << 20) as ftrain, \
             open(tmp["val"], "wb", buffering=1 << 20) as fval:
            docs = iter_documents(files)
            if workers > 1:
                # imap keeps document order; it reads ahead only as far as the task pipe
                # holds, so the corpus streams through instead of sitting in memory
                # spawn, not fork: a forked child of a process that already runs torch threads can deadlock
                pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
                encoded = pool.imap(_encode, docs, chunksize=16)
            else:
                _init_worker(tokenizer)
                encoded = map(_encode, docs)
            for i, (ids, nbytes) in enumerate(encoded):
                split = "val" if i % VAL_EVERY == 0 else "train"
                (fval if split == "val" else ftrain).write(ids.tobytes())
                ntok[split] += len(ids)
                ndocs[split] += 1
                done_bytes += nbytes
                if not quiet and time.time() - last_print > 5:
                    last_print = time.time()
                    dt, frac = last_print - t0, done_bytes / max(total_bytes, 1)
                    eta = dt * (1 - frac) / max(frac, 1e-9)
                    tokens = ntok["train"] + ntok["val"]
                    print(f"{i + 1} docs | {tokens:,} tokens | {tokens / dt:,.0f} tok/s | "
                          f"{100 * frac:.1f}% | ETA {eta:.0f}s", flush=True)
        for s in ("train", "val"):
            os.replace(tmp[s], folder / f"{s}.bin")
    finally:
        if pool is not None:
            pool.terminate()
        for p in tmp.values():
            p.unlink(missing_ok=True)

    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name,
                sep_id=tok.sep_id, train_tokens=ntok["train"], val_tokens=ntok["val"],
                train_docs=ndocs["train"], val_docs=ndocs["val"], source=source)
    (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(folder / "meta.json.tmp", folder / "meta.json")
    if not quiet:
        print(f"wrote {folder}: train {ndocs['train']} docs {ntok['train']:,} tokens, "
              f"val {ndocs['val']} docs {ntok['val']:,} tokens ({tok.name}, {np.dtype(dtype).name}) "
              f"in {time.time() - t0:.1f}s")
    return str(folder)

# -----------------------------------------------------------------------------
# the encoder objectives (BERT): special tokens, MLM + NSP pairs, labelled examples.
# A batch is a dict of numpy arrays named like Transformer.forward's arguments. Every row is a pure
# function of (seed, step, global row index) in training, and of the row index alone in evaluation,
# so resuming needs no sampler state and every world size sees the same global batch.

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")  # ids base vocab_size + 0..3
N_SPECIAL = len(SPECIAL_TOKENS)
MASK_PROB = 0.15  # MLM: chosen share of the real tokens of a pair; of those 80% [MASK], 10% random, 10% kept
CLASSIFY_DEMO = "stdlib_modules"  # the built-in labelled task, see stdlib_module_examples


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
    if objective == "classify":
        if "labels" not in meta:
            raise ValueError(f"{data_dir} has no labels (meta.json 'labels'); objective='classify' needs a labelled "
                             f"corpus: prepare.py --classify --name=NAME --input=FILE.jsonl")
        c["labels"] = np.load(Path(data_dir) / f"{split}_labels.npy")
        if len(c["labels"]) != len(ends):
            raise ValueError(f"{data_dir}: {len(c['labels'])} {split} labels for {len(ends)} documents; re-run prepare.py")
        return c
    table = newline_tokens(meta)
    c["nl"] = _positions(data, lambda a: table[a])
    if ((c["ends"] - c["starts"]) >= 2).sum() < 2:
        raise ValueError(f"{c['name']}: next sentence prediction needs at least two documents of 2+ tokens")
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


def stdlib_module_examples(k=8, nbytes=256, per_file=16):
    """[(text, label, split)] of the demo task: from which top-level stdlib package (json/decoder.py ->
    json) does a snippet of nbytes come. The k packages with the most files are kept; each file gives up
    to per_file evenly spaced, non-overlapping snippets. Files split exactly like pystdlib (file i of
    pystdlib_files() goes to val when i % VAL_EVERY == 0), so the pretraining corpus never holds a
    validation snippet in its training split."""
    files = pystdlib_files()
    top = [rel.split("/")[0] if "/" in rel else rel[:-3] for rel, _ in files]
    counts = Counter(top)
    keep = set(sorted(counts, key=lambda p: (-counts[p], p))[:k])
    out = []
    for i, ((rel, path), label) in enumerate(zip(files, top)):
        if label not in keep:
            continue
        raw = Path(path).read_bytes()
        n = max(1, len(raw) // nbytes)
        for j in np.unique(np.linspace(0, n - 1, min(per_file, n)).round().astype(int)):
            text = raw[j * nbytes:(j + 1) * nbytes].decode("utf-8", errors="ignore")
            if text.strip():
                out.append((text, label, "val" if i % VAL_EVERY == 0 else "train"))
    return out


def prepare_classify(name=CLASSIFY_DEMO, inputs=None, tokenizer="bytes", out_dir="data", quiet=False):
    """A labelled corpus data/NAME (format: the module docstring) from .jsonl files of {"text", "label"}
    (line i of all inputs goes to val when i % VAL_EVERY == 0), or the built-in demo task."""
    if inputs:
        examples, i = [], 0
        for f in expand_inputs(inputs):
            for lineno, line in enumerate(open(f, encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text, label = rec["text"], rec["label"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f"{f}:{lineno}: expected a JSON object with a 'text' string and a 'label'")
                examples.append((text, str(label), "val" if i % VAL_EVERY == 0 else "train"))
                i += 1
    elif name == CLASSIFY_DEMO:
        examples = stdlib_module_examples()
    else:
        raise ValueError(f"no labelled corpus {name!r} built in (only {CLASSIFY_DEMO!r}); give --input=FILE.jsonl")
    labels = sorted({lab for _, lab, split in examples if split == "train"})
    unseen = sorted({lab for _, lab, split in examples if split == "val"} - set(labels))
    if unseen or len(labels) < 2:
        raise ValueError(f"labels {unseen} occur only in validation lines" if unseen else
                         f"a classification corpus needs 2+ labels in its training lines, got {labels}")
    tok, folder = get_tokenizer(tokenizer), Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=np.dtype(dtype_for_vocab(tok.vocab_size)).name,
                sep_id=tok.sep_id, labels=labels, source=f"{name}: {len(examples)} labelled examples")
    for split in ("train", "val"):
        part = [(t, lab) for t, lab, sp in examples if sp == split]
        ids = np.array([i for t, _ in part for i in tok.encode(t) + [tok.sep_id]], dtype=meta["dtype"])
        ids.tofile(folder / f"{split}.bin")
        np.save(folder / f"{split}_labels.npy", np.array([labels.index(lab) for _, lab in part], np.int64))
        meta.update({f"{split}_tokens": len(ids), f"{split}_docs": len(part)})
    (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(folder / "meta.json.tmp", folder / "meta.json")
    if not quiet:
        print(f"wrote {folder}: {meta['train_docs']} train / {meta['val_docs']} val examples, {len(labels)} labels")
    return str(folder)

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tokenize text into data/NAME/{train,val}.bin + meta.json.")
    parser.add_argument("--classify", action="store_true", help="inputs are .jsonl lines {\"text\": ..., \"label\": ...}: "
                        "a labelled corpus for train.py --objective=classify")
    parser.add_argument("--name", default=None, help="output folder under --out_dir (default: pystdlib)")
    parser.add_argument("--input", action="extend", nargs="+", default=[],
                        help="files, directories or globs; .jsonl gives one document per line ('text' field)")
    parser.add_argument("--tokenizer", default="bytes", help="bytes, or a tiktoken encoding: gpt2, cl100k_base, ...")
    parser.add_argument("--out_dir", default="data")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: min(cpu count, 8), or 1 for small/bytes jobs)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.input and args.name is None:
        parser.error("--input needs a --name for the output folder")
    try:
        if args.classify:
            prepare_classify(args.name or CLASSIFY_DEMO, args.input, args.tokenizer, args.out_dir, args.quiet)
        else:
            prepare(args.name or "pystdlib", args.input, args.tokenizer, args.out_dir, args.workers, args.quiet)
    except (RuntimeError, ValueError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
