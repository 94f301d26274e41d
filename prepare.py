"""
Turn text into token files that train.py can read.

    python prepare.py                     # built-in corpus: Python stdlib, bytes tokenizer
    python prepare.py --name=notes --input=notes/ --input=more.jsonl --tokenizer=gpt2
    python prepare.py --name=fineweb_edu --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \\
                      --tokenizer=gpt2 --val_docs=10000
    python prepare.py --name=notes --input=new_notes/ --append    # more documents, the rest not re-tokenized

Writes the format that data.py documents and reads: data/NAME/{train.bin, val.bin, meta.json}, and for
labelled corpora {train,val}_labels.npy. The inputs (readers.py) are text and code files and folders of
them, JSON lines (.jsonl, .jsonl.gz, .jsonl.zst) and Parquet files with the text in --text_field, and a
Hugging Face dataset, streamed; all are read one document at a time. Validation: --val_fraction,
evenly spaced (default 0.05, every 20th document, the built-in corpus's fixed rule), up to --val_docs
documents. --append adds documents to a corpus as if they had been given to the run that made it.

Tokenizers: "bytes" is UTF-8 bytes 0..255 with separator 256 (vocab 257), and needs nothing. Any
tiktoken encoding (gpt2, cl100k_base, o200k_base, ...) uses its <|endoftext|> token as separator;
tiktoken downloads its files on first use, or reads them from the folder in TIKTOKEN_CACHE_DIR. A path
names a tiktoken-format BPE file (LLaMA-3's tokenizer.model is one): its ranks, then the separator.
A path ending in .json names a Hugging Face tokenizer.json (pip install tokenizers), whose separator
is the eos_token of the tokenizer_config.json beside it (else </s>, <|endoftext|>, ...). For paths,
meta.json records the absolute path, and the model's vocab_size follows the file.

Tokenizing runs in --workers processes, spawned (never forked: a caller such as train.py may hold
torch's threads); documents are written in input order, so the files do not depend on --workers.
"""

import argparse
import json
import math
import multiprocessing
import os
import signal
import sys
import sysconfig
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from itertools import chain, islice
from pathlib import Path

import numpy as np

from common import UserError, atomic_write, read_jsonl
from readers import check_packages, expand_inputs, hf_documents, iter_documents, open_hf_dataset
from tokenizer import dtype_for_vocab, get_tokenizer, get_tokenizer_from_meta  # noqa: F401 (prepare.get_tokenizer*)

VAL_EVERY = 20  # the built-in corpora: document i goes to validation when i % VAL_EVERY == 0; fixed, never change
VAL_FRACTION = 1 / VAL_EVERY  # the default for other corpora: the same rule
PYSTDLIB_EXCLUDE = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
CHUNK_CHARS = 1 << 20  # documents are tokenized in chunks of about this much text, a few chunks ahead of the writer
REPORT_AFTER = 5  # seconds to the first progress line; then 5 to 60 s apart, so a long run's log stays short

# -----------------------------------------------------------------------------
# the documents: readers.py reads them; here, which ones, and which split each goes to

def pystdlib_files():
    """[(relpath, abspath)] of the stdlib's .py files, sorted by relpath: the pystdlib documents."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(root).as_posix(), str(p)) for p in root.rglob("*.py")
             if p.is_file() and not PYSTDLIB_EXCLUDE & set(p.relative_to(root).parts)]
    return sorted(files)


def open_inputs(inputs, hf_dataset, hf_config, hf_split, text_field):
    """(documents, what they are for meta.json, total input bytes, total documents) of the --input files
    and then the streamed dataset; a total is None when unknown. What can fail before reading fails here."""
    files = expand_inputs(inputs) if inputs else []
    check_packages(files)
    docs, described = iter_documents(files, text_field), [os.path.abspath(os.path.expanduser(i)) for i in inputs or []]
    total_bytes, total_docs = sum(os.path.getsize(f) for f in files), None
    if hf_dataset:
        ds = open_hf_dataset(hf_dataset, hf_config, hf_split)
        docs = chain(docs, hf_documents(ds, hf_dataset, text_field))
        described.append(f"hf:{hf_dataset}" + (f"/{hf_config}" if hf_config else "") + f":{hf_split}")
        splits = ds.info.splits or {}  # known for hub datasets that publish their sizes
        total_bytes, total_docs = None, splits[hf_split].num_examples if hf_split in splits and not files else None
    return docs, described, total_bytes, total_docs


def split_inside(docs, val_fraction):
    """(documents, whether they are split inside): with fewer than 1/val_fraction of them (one text file, say), each
    is cut in two, at the line boundary before 1 - val_fraction of its text: its head goes to train, its tail to
    val (nanoGPT's split of its one file). Otherwise the documents as they come (split_rule splits them)."""
    first = list(islice(docs, math.ceil(1 / val_fraction)))
    if len(first) >= 1 / val_fraction:
        return chain(first, docs), False
    cuts = [(text, text.rfind("\n", 0, round(len(text) * (1 - val_fraction))) + 1
             or round(len(text) * (1 - val_fraction)), nbytes) for text, nbytes in first]
    return [part for text, cut, nbytes in cuts for part in ((text[:cut], nbytes), (text[cut:], 0))], True


def split_rule(val_fraction, val_docs=None):
    """is_val(i, n_val): does document i (counted from the corpus's first) go to validation, n_val being
    there already. Evenly spaced from the first document, floor(i F) > floor((i - 1) F) with F the exact
    decimal val_fraction (0.05: i % 20 == 0), until val_docs are there."""
    f = Fraction(str(val_fraction))
    p, q = f.numerator, f.denominator
    return lambda i, n_val: (val_docs is None or n_val < val_docs) and (i * p) // q > ((i - 1) * p) // q

# -----------------------------------------------------------------------------
# tokenizing, in worker processes, in order

def chunks(docs, n_chars):
    """The (text, nbytes) documents in lists of about n_chars characters of text."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc[0])
        if size >= n_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_chunk(chunk, tok=None):
    """A chunk of (text, nbytes) documents -> (all their ids, each followed by the separator, in the corpus dtype;
    the offsets of the documents in it; their input nbytes; their UTF-8 bytes; their largest ids). One array
    per chunk: cheap to send back from a worker process. tok None: the worker's own tokenizer."""
    tok = tok or WORKER["tok"]
    ids = tok.encode_batch([text for text, _ in chunk])
    offsets = np.cumsum([0] + [len(a) + 1 for a in ids])
    out = np.empty(offsets[-1], dtype_for_vocab(tok.vocab_size))
    for a, start, end in zip(ids, offsets[:-1], offsets[1:]):
        out[start:end - 1], out[end - 1] = a, tok.sep_id
    tops = np.maximum.reduceat(out, offsets[:-1]).tolist()  # each document's largest id (none is empty: the separator)
    return out, offsets, [n for _, n in chunk], [len(t.encode("utf-8", errors="replace")) for t, _ in chunk], tops


WORKER = {}


def start_worker(tokenizer):
    """A tokenizing process: its own tokenizer; Ctrl-C is the main process's to handle (it stops the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a Hugging Face tokenizer: one thread per process
    WORKER["tok"] = get_tokenizer(tokenizer)


def tokenized(docs, tok, workers=1):
    """(ids with the separator appended, in the corpus dtype; input nbytes; UTF-8 bytes of the text; largest id)
    for each (text, nbytes) document, in input order. With workers > 1 that many spawned processes (never forked: the
    caller may hold torch's threads) tokenize chunks, at most 2 * workers chunks ahead of the caller, so
    memory stays bounded; the result is the same for any workers. Processes, not threads: tiktoken's
    threads scale to ~1.6x on 2 cores, its processes to ~2x."""
    def unpack(result):
        out, offsets, nbytes, utf8, tops = result
        for i in range(len(nbytes)):
            yield out[offsets[i]:offsets[i + 1]], nbytes[i], utf8[i], tops[i]

    if workers == 1:
        for chunk in chunks(docs, CHUNK_CHARS):
            yield from unpack(encode_chunk(chunk, tok))
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), start_worker, (tok.name,))
    ahead = deque()
    try:
        for chunk in chunks(docs, CHUNK_CHARS):
            ahead.append(pool.submit(encode_chunk, chunk))
            if len(ahead) > 2 * workers:
                yield from unpack(ahead.popleft().result())
        while ahead:
            yield from unpack(ahead.popleft().result())
    finally:  # also when the caller stops early: no process keeps tokenizing
        pool.shutdown(cancel_futures=True)


def report(t0, docs, tokens, text_bytes, frac):
    """One progress line on stderr: documents, tokens, MB/s of text and, when the total is known, an ETA."""
    dt = max(time.time() - t0, 1e-6)
    left = dt * max(0, 1 - frac) / frac if frac else 0
    eta = f", {100 * frac:.1f}%, ETA {int(left // 3600)}:{time.strftime('%M:%S', time.gmtime(left))}" if frac else ""
    print(f"prepare: {docs:,} docs, {tokens:,} tokens, {text_bytes / 1e6 / dt:.1f} MB/s{eta}", file=sys.stderr,
          flush=True)

# -----------------------------------------------------------------------------
# writing a corpus

def write_meta(folder, tok, counts, **extra):
    """meta.json (data.py lists its keys), written last and atomically: it marks the corpus complete."""
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=np.dtype(dtype_for_vocab(tok.vocab_size)).name,
                sep_id=tok.sep_id, **counts, **extra)
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def write_documents(folder, split, tok, texts):
    """folder/SPLIT.bin from a small in-memory corpus (the labelled and seq2seq ones), each text followed by the
    separator; the first call drops meta.json (the old corpus is no longer complete). Returns the split's counts."""
    if split == "train":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)
    ids = np.array([i for t in texts for i in tok.encode(t) + [tok.sep_id]], dtype=dtype_for_vocab(tok.vocab_size))
    ids.tofile(folder / f"{split}.bin")
    return {f"{split}_tokens": len(ids), f"{split}_docs": len(texts), f"{split}_max_id": int(ids.max(initial=0)),
            f"{split}_bytes": sum(len(t.encode("utf-8")) for t in texts)}


def read_old_meta(folder, tokenizer, val_fraction, val_docs):
    """--append: the corpus's meta.json, checked against this run's tokenizer and split options."""
    path = folder / "meta.json"
    if not path.is_file():
        raise UserError(f"--append: {path} not found, so there is no corpus to add to; drop --append to make one")
    meta = json.loads(path.read_text())
    if "labels" in meta or "val_fraction" not in meta or meta.get("split_inside"):
        raise UserError(f"--append: {folder} is labelled, split inside its few documents, or older than --append (no "
                        f"val_fraction in its meta.json): it cannot be appended to; make it again from all the inputs")
    for key, option, value in (("tokenizer", "tokenizer", tokenizer), ("val_fraction", "val_fraction", val_fraction),
                               ("val_docs_limit", "val_docs", val_docs)):
        if value is not None and value != meta[key]:
            raise UserError(f"--append: {folder} was made with --{option}={meta[key]!r}, this run asks for {value!r}; "
                            f"leave --{option} out to use the corpus's")
    return meta


def write_splits(folder, encoded, is_val, counts, dtype, append=False, progress=None):
    """Write the tokenized documents (tokenized()'s tuples) to folder/{train,val}.bin, each to the split
    is_val(i, n_val) gives it, and return counts (tokens, documents and largest id per split) updated from
    those of the corpus so far. A new corpus is written under temporary names, then renamed; an appended
    one in place, and cut back to where meta.json says it ends if anything fails. progress: (t0, total
    bytes, total documents) for the progress lines on stderr, or None."""
    if append:
        kept = {s: counts[f"{s}_tokens"] * np.dtype(dtype).itemsize for s in ("train", "val")}
        paths = {s: folder / f"{s}.bin" for s in kept}
        for s, p in paths.items():
            if not p.is_file() or p.stat().st_size < kept[s]:
                raise UserError(f"--append: {p} is shorter than its meta.json says; re-make the corpus without "
                                f"--append")
            os.truncate(p, kept[s])  # bytes past the recorded end are what an interrupted --append left
    else:
        (folder / "meta.json").unlink(missing_ok=True)  # the old corpus is no longer complete
        paths = {s: folder / f"{s}.bin.tmp{os.getpid()}" for s in ("train", "val")}
    counts, first = dict(counts), counts["train_docs"] + counts["val_docs"]
    i, done, text_bytes, ok = first, 0, 0, False
    next_report = progress and progress[0] + REPORT_AFTER
    try:
        with open(paths["train"], "ab", buffering=1 << 20) as ftrain, \
                open(paths["val"], "ab", buffering=1 << 20) as fval:
            for ids, nbytes, utf8, top in encoded:
                split = "val" if is_val(i, counts["val_docs"]) else "train"
                (fval if split == "val" else ftrain).write(ids)  # the buffer itself, no copy
                counts[f"{split}_tokens"] += len(ids)
                counts[f"{split}_docs"] += 1
                counts[f"{split}_max_id"] = max(counts[f"{split}_max_id"], top)
                counts[f"{split}_bytes"] += utf8  # the denominator of bits per byte
                i, done, text_bytes = i + 1, done + nbytes, text_bytes + utf8
                if progress and time.time() >= next_report:
                    t0, total, total_docs = progress
                    report(t0, i - first, counts["train_tokens"] + counts["val_tokens"], text_bytes,
                           total and done / total or total_docs and (i - first) / total_docs)
                    next_report = time.time() + min(60, max(5, (time.time() - t0) / 10))
        if not append:
            for s, p in paths.items():
                os.replace(p, folder / f"{s}.bin")
        ok = True
    finally:
        for s, p in paths.items():
            if append and not ok:
                os.truncate(p, kept[s])
            elif not append:
                p.unlink(missing_ok=True)
    return counts


def prepare(name="pystdlib", inputs=None, tokenizer=None, out_dir="data", workers=None, quiet=False, *,
            text_field="text", hf_dataset=None, hf_config=None, hf_split="train", val_fraction=None, val_docs=None,
            append=False):
    """Build data/NAME/{train.bin,val.bin,meta.json} (format: see data.py) from the input files and/or a
    Hugging Face dataset, or with append=True add them to it as one prepare over all the inputs would
    have. tokenizer None: "bytes", or when appending the corpus's. Returns the folder."""
    t0, folder = time.time(), Path(out_dir) / name
    if name in BUILTIN and name != "pystdlib" and not inputs:
        return BUILTIN[name](name, None, tokenizer or "bytes", out_dir, quiet)
    if name == "pystdlib":
        if inputs or hf_dataset or append or val_fraction or val_docs:
            raise UserError("'pystdlib' is the built-in corpus with its fixed split; give your inputs another --name")
        files, stdlib = [f for _, f in pystdlib_files()], sysconfig.get_paths()["stdlib"]
        docs, described, total, total_docs = iter_documents(files), [stdlib], sum(map(os.path.getsize, files)), None
        source = (f"{len(files)} .py files of the Python {sys.version.split()[0]} stdlib ({stdlib}), without "
                  f"tests/idlelib")
    elif inputs or hf_dataset:
        docs, described, total, total_docs = open_inputs(inputs, hf_dataset, hf_config, hf_split, text_field)
        source = None  # the inputs, those of earlier --append runs included
    else:
        raise UserError(f"no corpus {name!r}: the built-in ones are {', '.join(BUILTIN)}; "
                        f"build {name!r} with: python prepare.py --name={name} --input=PATH ...")
    old = read_old_meta(folder, tokenizer and get_tokenizer(tokenizer).name, val_fraction, val_docs) if append else None
    tok = get_tokenizer(old["tokenizer"] if old else tokenizer or "bytes")  # fails early (e.g. tiktoken offline)
    if old:
        val_fraction, val_docs, described = old["val_fraction"], old["val_docs_limit"], old["inputs"] + described
    val_fraction, dtype = val_fraction or VAL_FRACTION, dtype_for_vocab(tok.vocab_size)
    if workers is None:  # processes pay off for BPE; the bytes tokenizer is one memory copy
        workers = 1 if tok.name == "bytes" else min(os.cpu_count() or 1, 8)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {f"{s}_{k}": old.get(f"{s}_{k}", 0) if old else 0
              for k in ("tokens", "docs", "max_id", "bytes") for s in ("train", "val")}
    docs, inside = split_inside(docs, val_fraction) if not old else (docs, False)
    rule = (lambda i, n_val: i % 2 == 1) if inside else split_rule(val_fraction, val_docs)
    counts = write_splits(folder, tokenized(docs, tok, workers), rule, counts, dtype, append=bool(old),
                          progress=None if quiet else (t0, total, total_docs))
    if old and "train_bytes" not in old:  # an older corpus: data.max_ids counts its bytes once, when first read
        counts = {k: v for k, v in counts.items() if not k.endswith("_bytes")}
    write_meta(folder, tok, counts, source=source or ", ".join(described), inputs=described,
               val_fraction=val_fraction, val_docs_limit=val_docs, **({"split_inside": True} if inside else {}))
    if not quiet:
        print(f"wrote {folder}: train {counts['train_docs']:,} docs {counts['train_tokens']:,} tokens, "
              f"val {counts['val_docs']:,} docs {counts['val_tokens']:,} tokens ({tok.name}, {np.dtype(dtype).name}) "
              f"in {time.time() - t0:.1f}s")
    return str(folder)

# -----------------------------------------------------------------------------
# labelled corpora, for classification fine-tuning (the batches: data.py)

CLASSIFY_DEMO = "stdlib_modules"  # the built-in labelled task, see stdlib_module_examples


def stdlib_module_examples(min_files=5, nbytes=126):
    """[(text, label, split)] of the demo task: from which top-level stdlib package (json/decoder.py ->
    json) does a snippet of nbytes come. The packages of min_files or more files are kept (19 on Python
    3.11); each of their files is cut into consecutive snippets of nbytes (126: all that seq_len=128 reads
    between [CLS] and [SEP]). Files split exactly like pystdlib (file i of pystdlib_files() goes to val
    when i % VAL_EVERY == 0), so the pretraining corpus never holds a validation snippet in its training
    split; every snippet of those files is used, for a validation set of ~2,000."""
    files = pystdlib_files()
    top = [rel.split("/")[0] if "/" in rel else rel[:-3] for rel, _ in files]
    counts = Counter(top)
    out = []
    for i, ((rel, path), label) in enumerate(zip(files, top)):
        if counts[label] < min_files:
            continue
        raw = Path(path).read_bytes()
        for j in range(0, len(raw), nbytes):
            text = raw[j:j + nbytes].decode("utf-8", errors="ignore")
            if text.strip():
                out.append((text, label, "val" if i % VAL_EVERY == 0 else "train"))
    return out


def prepare_classify(name=CLASSIFY_DEMO, inputs=None, tokenizer="bytes", out_dir="data", quiet=False):
    """A labelled corpus data/NAME (format: data.py) from .jsonl files of {"text", "label"}
    (line i of all inputs goes to val when i % VAL_EVERY == 0), or the built-in demo task."""
    if inputs:
        examples, i = [], 0
        for f in expand_inputs(inputs):
            for lineno, rec, _ in read_jsonl(f):
                if not (isinstance(rec, dict) and isinstance(rec.get("text"), str) and "label" in rec):
                    raise UserError(f"{f}:{lineno}: expected a JSON object with a 'text' string and a 'label'")
                examples.append((rec["text"], str(rec["label"]), "val" if i % VAL_EVERY == 0 else "train"))
                i += 1
    elif name == CLASSIFY_DEMO:
        examples = stdlib_module_examples()
    else:
        raise UserError(f"no labelled corpus {name!r} built in (only {CLASSIFY_DEMO!r}); give --input=FILE.jsonl")
    labels = sorted({lab for _, lab, split in examples if split == "train"})
    unseen = sorted({lab for _, lab, split in examples if split == "val"} - set(labels))
    if unseen or len(labels) < 2:
        raise UserError(f"labels {unseen} occur only in validation lines" if unseen else
                         f"a classification corpus needs 2+ labels in its training lines, got {labels}")
    tok, folder = get_tokenizer(tokenizer), Path(out_dir) / name
    counts = {}
    for split in ("train", "val"):
        part = [(t, lab) for t, lab, sp in examples if sp == split]
        counts.update(write_documents(folder, split, tok, [t for t, _ in part]))
        np.save(folder / f"{split}_labels.npy", np.array([labels.index(lab) for _, lab in part], np.int64))
    meta = write_meta(folder, tok, counts, labels=labels, source=f"{name}: {len(examples)} labelled examples")
    if not quiet:
        print(f"wrote {folder}: {meta['train_docs']} train / {meta['val_docs']} val examples, {len(labels)} labels")
    return str(folder)

# -----------------------------------------------------------------------------
# seq2seq corpora, for the encoder-decoder (format and batches: data.py)

SEQ2SEQ_DEMO = "stdlib_params"  # the built-in seq2seq task, see stdlib_param_examples


def stdlib_functions():
    """(file number, function node, the file's lines) of every function in the pystdlib files, in file order;
    a file this Python cannot parse gives none."""
    import ast
    for i, (_, path) in enumerate(pystdlib_files()):
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield i, f, lines


def stdlib_param_examples(max_bytes=63):
    """[(source, target, split)] of the demo task: the header of a stdlib function (`def name(...):`, its
    lines up to the body, dedented; at most max_bytes, no comment) -> its parameter names in order,
    space-separated, with * and ** on *args and **kwargs: `def get(self, key, default=None):` -> `self key
    default`. Only functions of 2+ parameters, each header once (its first file decides the split), and no
    target that is a substring of its source, so no copy of any part of the source is the answer. Split by
    file like pystdlib (file i to val when i % VAL_EVERY == 0): pretraining on pystdlib never saw a val header."""
    import textwrap
    out, seen = [], set()
    for i, f, lines in stdlib_functions():
        a = f.args
        names = [p.arg for p in a.posonlyargs + a.args] + [f"*{v.arg}" for v in [a.vararg] if v] + \
                [p.arg for p in a.kwonlyargs] + [f"**{v.arg}" for v in [a.kwarg] if v]
        header = textwrap.dedent("".join(lines[f.lineno - 1:f.body[0].lineno - 1])).strip()
        target = " ".join(names)
        if (len(names) >= 2 and header.startswith(("def ", "async def ")) and header.endswith(":")
                and "#" not in header and len(header.encode()) <= max_bytes and target not in header
                and header not in seen):
            seen.add(header)
            out.append((header, target, "val" if i % VAL_EVERY == 0 else "train"))
    return out


def first_sentence(doc):
    """A docstring's first sentence: its first paragraph on one line, up to the first . ! or ? before a space."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = next((k + 1 for k, ch in enumerate(para) if ch in ".!?" and para[k + 1:k + 2] in ("", " ")), len(para))
    return para[:end]


def stdlib_docstring_examples(max_source=511, max_target=95):
    """[(source, target, split)] of the summarisation demo task: a stdlib function's source (decorators, header
    and body, dedented) with its docstring's lines removed -> the docstring's first sentence, e.g.
    `def subtract(self, a, b):\\n    a = _convert_other(a, raiseit=True) ...` -> `Return the difference between
    the two operands.` Functions whose docstring has lines of its own and whose body has more than it; sources
    of at most max_source bytes, targets of 2+ words and 8 to max_target bytes. No target occurs in its source
    (case and spacing ignored), so no copy of any part of the source is the answer; each source once (its first
    file decides the split). Split by file like pystdlib: pretraining on pystdlib never saw a val function."""
    import ast
    import textwrap
    flat = lambda text: " ".join(text.lower().split())
    out, seen = [], set()
    for i, f, lines in stdlib_functions():
        doc, d = ast.get_docstring(f), f.body[0]
        if len(f.body) < 2 or not doc or d.lineno == f.body[1].lineno:
            continue
        if not "".join(lines[f.lineno - 1:d.lineno - 1]).rstrip().endswith(":"):
            continue  # the docstring shares a line with the header, or a comment comes before it
        start, after = min([f.lineno] + [x.lineno for x in f.decorator_list]) - 1, d.end_lineno
        while after < f.end_lineno and not lines[after].strip():  # the blank lines after the docstring go too
            after += 1
        source = textwrap.dedent("".join(lines[start:d.lineno - 1] + lines[after:f.end_lineno])).rstrip()
        target = first_sentence(doc)
        if (len(source.encode()) <= max_source and 8 <= len(target.encode()) <= max_target
                and len(target.split()) >= 2 and flat(target) not in flat(source) and source not in seen
                and parses(source)):
            seen.add(source)
            out.append((source, target, "val" if i % VAL_EVERY == 0 else "train"))
    return out


def parses(source):
    """Whether Python parses the source (a string of lines at column 0 inside a function stops dedent)."""
    import ast
    try:
        return bool(ast.parse(source))
    except SyntaxError:
        return False


SEQ2SEQ_DEMOS = {SEQ2SEQ_DEMO: stdlib_param_examples, "stdlib_docstrings": stdlib_docstring_examples}  # built in


def prepare_seq2seq(name=SEQ2SEQ_DEMO, inputs=None, tokenizer="bytes", out_dir="data", quiet=False):
    """A seq2seq corpus data/NAME (format: data.py) from .jsonl files of {"source", "target"} (line k of all
    inputs goes to val when k % VAL_EVERY == 0), or the built-in demo task."""
    if inputs:
        examples = []
        for f in expand_inputs(inputs):
            for lineno, rec, _ in read_jsonl(f):  # a line that is not JSON: read_jsonl names the file and line
                if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("source", "target"))):
                    raise UserError(f"{f}:{lineno}: expected a JSON object with 'source' and 'target' strings")
                examples.append((rec["source"], rec["target"], "val" if len(examples) % VAL_EVERY == 0 else "train"))
    elif name in SEQ2SEQ_DEMOS:
        examples = SEQ2SEQ_DEMOS[name]()
    else:
        raise UserError(f"no seq2seq corpus {name!r} built in (only {', '.join(SEQ2SEQ_DEMOS)}); give "
                        f"--input=FILE.jsonl")
    tok, folder = get_tokenizer(tokenizer), Path(out_dir) / name
    counts = {}
    for split in ("train", "val"):
        pairs = [text for s, t, sp in examples if sp == split for text in (s, t)]
        counts.update(write_documents(folder, split, tok, pairs))
    meta = write_meta(folder, tok, counts, seq2seq=True, source=f"{name}: {len(examples)} source/target pairs")
    if not quiet:
        print(f"wrote {folder}: {meta['train_docs'] // 2} train / {meta['val_docs'] // 2} val source/target pairs")
    return str(folder)

BUILTIN = {"pystdlib": prepare, CLASSIFY_DEMO: prepare_classify,  # made on first use
           **{name: prepare_seq2seq for name in SEQ2SEQ_DEMOS}}


# -----------------------------------------------------------------------------

def check_args(args):
    """The command line's values, before any input is read or anything written."""
    if (args.input or args.hf_dataset or args.append) and args.name is None:
        given = '--input' if args.input else '--hf_dataset' if args.hf_dataset else '--append'
        raise UserError(f"{given} needs a --name for the output folder")
    if args.name is not None and (not args.name.strip() or "/" in args.name or args.name in (".", "..")):
        raise UserError(f"--name={args.name!r} must name one folder under --out_dir (no '/'), e.g. --name=mycorpus")
    if not args.out_dir.strip():
        raise UserError("--out_dir must not be empty; the default is data")
    if args.classify and args.seq2seq:
        raise UserError("--classify and --seq2seq make different corpora: give one of them")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers={args.workers} must be >= 1 (or left out: min(cpu count, 8) processes for BPE)")
    if not args.text_field:
        raise UserError("--text_field must name the field or column that holds the text, e.g. --text_field=text")
    if (args.hf_config or args.hf_split != "train") and not args.hf_dataset:
        raise UserError(f"--hf_{'config' if args.hf_config else 'split'} belongs to --hf_dataset=NAME, which is "
                        f"missing")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction={args.val_fraction} must be between 0 and 1, e.g. 0.05 (every 20th document)")
    if args.val_docs is not None and args.val_docs < 1:
        raise UserError(f"--val_docs={args.val_docs} must be >= 1 (or left out: no limit)")
    if args.classify and (args.hf_dataset or args.append or args.val_fraction or args.val_docs
                          or args.text_field != "text"):
        raise UserError("--classify reads .jsonl files of {\"text\", \"label\"} lines, every 20th to validation; "
                        "it takes no --hf_dataset, --append, --val_fraction, --val_docs or --text_field")
    if args.tokenizer is not None or not args.append:
        get_tokenizer(args.tokenizer or "bytes")  # an unknown or unloadable tokenizer, named before any input is read


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tokenize text into data/NAME/{train,val}.bin + meta.json.")
    parser.add_argument("--classify", action="store_true", help="inputs are .jsonl lines {\"text\": ..., "
                        "\"label\": ...}: a labelled corpus for train.py --objective=classify")
    parser.add_argument("--seq2seq", action="store_true", help="inputs are .jsonl lines {\"source\": ..., "
                        "\"target\": ...}: a corpus for train.py --objective=seq2seq (an encoder-decoder)")
    parser.add_argument("--name", default=None, help="output folder under --out_dir (default: pystdlib)")
    parser.add_argument("--input", action="extend", nargs="+", default=[],
                        help="files, directories or globs; .jsonl(.gz/.zst) lines and .parquet rows are documents")
    parser.add_argument("--text_field", default="text", help="the JSON field / Parquet or dataset column of the text")
    parser.add_argument("--hf_dataset", default=None, help="a Hugging Face dataset (hub name or local folder), "
                        "streamed after the --input files (pip install datasets)")
    parser.add_argument("--hf_config", default=None, help="the dataset's configuration, e.g. sample-10BT")
    parser.add_argument("--hf_split", default="train")
    parser.add_argument("--tokenizer", default=None, help="bytes (the default), a tiktoken encoding (gpt2, "
                        "cl100k_base, ...), the path of a tiktoken-format BPE file such as LLaMA-3's tokenizer.model, "
                        "or of a Hugging Face tokenizer.json; --append uses the corpus's own")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="share of the documents for validation, evenly spaced (default 0.05: every 20th)")
    parser.add_argument("--val_docs", type=int, default=None, help="at most this many validation documents")
    parser.add_argument("--append", action="store_true", help="add the inputs to the corpus --name, with its "
                        "tokenizer and split, as if they had been given to the run that made it")
    parser.add_argument("--out_dir", default="data")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: min(cpu count, 8), or 1 for the bytes tokenizer)")
    parser.add_argument("--quiet", action="store_true")
    parser.error = lambda msg: sys.exit(print(f"prepare.py: error: {msg}", file=sys.stderr) or 2)  # one line
    args = parser.parse_args()
    try:
        check_args(args)
        if args.classify:
            prepare_classify(args.name or CLASSIFY_DEMO, args.input, args.tokenizer or "bytes", args.out_dir,
                             args.quiet)
        elif args.seq2seq:
            prepare_seq2seq(args.name or SEQ2SEQ_DEMO, args.input, args.tokenizer or "bytes", args.out_dir, args.quiet)
        else:
            prepare(args.name or "pystdlib", args.input, args.tokenizer, args.out_dir, args.workers, args.quiet,
                    text_field=args.text_field, hf_dataset=args.hf_dataset, hf_config=args.hf_config,
                    hf_split=args.hf_split, val_fraction=args.val_fraction, val_docs=args.val_docs, append=args.append)
    except (UserError, OSError) as e:
        sys.exit(print(f"prepare.py: error: {e}", file=sys.stderr) or 2)
    except KeyboardInterrupt:  # write_splits removed its partial files (an --append cut them back): nothing lost
        sys.exit("prepare.py: interrupted; no partial token file is left (an --append leaves the corpus as it was); "
                 "rerun to finish")
