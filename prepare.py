"""
Turn text into token files that train.py can read.

    python prepare.py                     # built-in corpus: Python stdlib, bytes tokenizer
    python prepare.py --name=notes --input=notes/ --input=more.jsonl --tokenizer=gpt2

Writes the format that data.py documents and reads: data/NAME/{train.bin, val.bin, meta.json}, and for
labelled corpora {train,val}_labels.npy. Document i of the inputs goes to validation when i % 20 == 0.

Tokenizers: "bytes" is UTF-8 bytes 0..255 with separator 256 (vocab 257), and needs
nothing. Any tiktoken encoding (gpt2, cl100k_base, o200k_base, ...) uses its
<|endoftext|> token as separator; tiktoken downloads its files on first use, or
reads them from the folder in TIKTOKEN_CACHE_DIR. A path names a tiktoken-format BPE
file (LLaMA-3's tokenizer.model is one): its ranks, then the separator; the model's
vocab_size follows (meta.json records the tokenizer's absolute path).
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

from common import UserError, atomic_write, read_jsonl

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
        raise UserError(f"tokenizer {name!r} needs tiktoken (pip install tiktoken); "
                           "--tokenizer=bytes needs nothing") from None
    if os.path.isfile(name):  # a tiktoken-format BPE file (LLaMA-3's tokenizer.model is one)
        enc, name = bpe_file_encoding(tiktoken, name), os.path.abspath(name)
    elif name not in tiktoken.list_encoding_names():
        valid = ", ".join(["bytes"] + tiktoken.list_encoding_names())
        raise UserError(f"unknown tokenizer {name!r}; valid names: {valid}, or the path of a tiktoken-format BPE file")
    else:
        enc = None
    try:
        enc = enc or tiktoken.get_encoding(name)
    except Exception as e:  # no network, a proxy, a corrupt download: all look alike to the user
        cause = f"{type(e).__name__}: {str(e)}".splitlines()[0]
        cause = cause if len(cause) < 100 else cause[:99] + "…"
        raise UserError(
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


# LLaMA-3's pre-tokenizer split (cl100k_base's, written without possessive quantifiers)
BPE_FILE_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def bpe_file_encoding(tiktoken, path):
    """A tiktoken Encoding from a BPE file of 'base64-token rank' lines, split by BPE_FILE_PATTERN; the
    document separator is the id after the last rank, so vocab_size = ranks + 1."""
    from tiktoken.load import load_tiktoken_bpe
    try:
        ranks = load_tiktoken_bpe(path)
    except Exception as e:
        raise UserError(f"tokenizer file {path!r} is not a tiktoken BPE file ({type(e).__name__}: {str(e)[:80]}); "
                        f"its lines must be 'base64-token rank'") from None
    return tiktoken.Encoding(os.path.basename(path), pat_str=BPE_FILE_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": max(ranks.values()) + 1})


def dtype_for_vocab(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32

def get_tokenizer_from_meta(meta):
    """The tokenizer a corpus was built with, from its meta.json dict."""
    tok = get_tokenizer(meta["tokenizer"])
    if (tok.vocab_size, tok.sep_id) != (meta["vocab_size"], meta["sep_id"]):
        raise UserError(f"tokenizer {tok.name!r} now has vocab_size={tok.vocab_size} "
                           f"sep_id={tok.sep_id}, but the corpus recorded "
                           f"{meta['vocab_size']} and {meta['sep_id']}; re-run prepare.py")
    return tok


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
            raise UserError(f"input {inp!r} matches no file or directory")
        for m in matches:
            if os.path.isdir(m):
                found = [p for p in Path(m).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTS
                         and not any(part.startswith(".") for part in p.relative_to(m).parts)]
                if not found:
                    raise UserError(f"input directory {inp!r} holds no text files "
                                            f"({' '.join(sorted(TEXT_EXTS))})")
                files.update(str(p.resolve()) for p in found)
            else:
                files.add(str(Path(m).resolve()))
    return sorted(files, key=lambda f: Path(f).as_posix())


def iter_documents(files):
    """Yield (text, input_bytes) one document at a time: a whole file, or one line of a .jsonl."""
    for f in files:
        if f.endswith(".jsonl"):
            for lineno, rec, nbytes in read_jsonl(f):
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{f}:{lineno}: expected a JSON object with a 'text' string")
                yield text, nbytes
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
    """Build data/NAME/{train.bin,val.bin,meta.json} (format: see data.py); returns the folder."""
    t0 = time.time()
    if name == CLASSIFY_DEMO and not inputs:
        return prepare_classify(name, None, tokenizer, out_dir, quiet)
    if name == SEQ2SEQ_DEMO and not inputs:
        return prepare_seq2seq(name, None, tokenizer, out_dir, quiet)
    if inputs:
        if name == "pystdlib":
            raise UserError("'pystdlib' is the built-in corpus; give your inputs another --name")
        files = expand_inputs(inputs)
        source = f"{len(files)} files from " + ", ".join(inputs)
    elif name == "pystdlib":
        files = [f for _, f in pystdlib_files()]
        source = f"{len(files)} .py files of the Python {sys.version.split()[0]} stdlib " \
                 f"({sysconfig.get_paths()['stdlib']}), without tests/idlelib"
    else:
        raise UserError(f"no corpus {name!r}: the only built-in corpus is 'pystdlib'; "
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
    ntok, ndocs, maxid = {"train": 0, "val": 0}, {"train": 0, "val": 0}, {"train": 0, "val": 0}
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
                maxid[split] = max(maxid[split], int(ids.max()))
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
                train_docs=ndocs["train"], val_docs=ndocs["val"], train_max_id=maxid["train"], val_max_id=maxid["val"],
                source=source)
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: it marks the corpus complete
    if not quiet:
        print(f"wrote {folder}: train {ndocs['train']} docs {ntok['train']:,} tokens, "
              f"val {ndocs['val']} docs {ntok['val']:,} tokens ({tok.name}, {np.dtype(dtype).name}) "
              f"in {time.time() - t0:.1f}s")
    return str(folder)

# -----------------------------------------------------------------------------
# labelled corpora, for classification fine-tuning (the batches: data.py)

CLASSIFY_DEMO = "stdlib_modules"  # the built-in labelled task, see stdlib_module_examples


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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=np.dtype(dtype_for_vocab(tok.vocab_size)).name,
                sep_id=tok.sep_id, labels=labels, source=f"{name}: {len(examples)} labelled examples")
    for split in ("train", "val"):
        part = [(t, lab) for t, lab, sp in examples if sp == split]
        ids = np.array([i for t, _ in part for i in tok.encode(t) + [tok.sep_id]], dtype=meta["dtype"])
        ids.tofile(folder / f"{split}.bin")
        np.save(folder / f"{split}_labels.npy", np.array([labels.index(lab) for _, lab in part], np.int64))
        meta.update({f"{split}_tokens": len(ids), f"{split}_docs": len(part), f"{split}_max_id": int(ids.max(initial=0))})
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: it marks the corpus complete
    if not quiet:
        print(f"wrote {folder}: {meta['train_docs']} train / {meta['val_docs']} val examples, {len(labels)} labels")
    return str(folder)

# -----------------------------------------------------------------------------
# seq2seq corpora, for the encoder-decoder (format and batches: data.py)

SEQ2SEQ_DEMO = "stdlib_params"  # the built-in seq2seq task, see stdlib_param_examples


def stdlib_param_examples(max_bytes=63):
    """[(source, target, split)] of the demo task: the header of a stdlib function (`def name(...):`, its
    lines up to the body, dedented; at most max_bytes, no comment) -> its parameter names in order,
    space-separated, with * and ** on *args and **kwargs: `def get(self, key, default=None):` -> `self key
    default`. Only functions of 2+ parameters, each header once (its first file decides the split), and no
    target that is a substring of its source, so no copy of any part of the source is the answer. Split by
    file like pystdlib (file i to val when i % VAL_EVERY == 0): pretraining on pystdlib never saw a val header."""
    import ast
    import textwrap
    out, seen = [], set()
    for i, (_, path) in enumerate(pystdlib_files()):
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):  # not parseable by this Python: no examples from it
            continue
        lines = text.splitlines(keepends=True)
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = f.args
            names = [p.arg for p in a.posonlyargs + a.args] + [f"*{v.arg}" for v in [a.vararg] if v] + \
                    [p.arg for p in a.kwonlyargs] + [f"**{v.arg}" for v in [a.kwarg] if v]
            header = textwrap.dedent("".join(lines[f.lineno - 1:f.body[0].lineno - 1])).strip()
            target = " ".join(names)
            if (len(names) >= 2 and header.startswith(("def ", "async def ")) and header.endswith(":") and "#" not in header
                    and len(header.encode()) <= max_bytes and target not in header and header not in seen):
                seen.add(header)
                out.append((header, target, "val" if i % VAL_EVERY == 0 else "train"))
    return out


def prepare_seq2seq(name=SEQ2SEQ_DEMO, inputs=None, tokenizer="bytes", out_dir="data", quiet=False):
    """A seq2seq corpus data/NAME (format: data.py) from .jsonl files of {"source", "target"} (line k of all
    inputs goes to val when k % VAL_EVERY == 0), or the built-in demo task."""
    if inputs:
        examples = []
        for f in expand_inputs(inputs):
            try:
                for lineno, rec, _ in read_jsonl(f):
                    if not (isinstance(rec, dict) and isinstance(rec.get("source"), str) and isinstance(rec.get("target"), str)):
                        raise UserError(f"{f}:{lineno}: expected a JSON object with 'source' and 'target' strings")
                    examples.append((rec["source"], rec["target"], "val" if len(examples) % VAL_EVERY == 0 else "train"))
            except ValueError as e:  # read_jsonl's "FILE:LINE: not a line of JSON"
                raise UserError(str(e)) from None
    elif name == SEQ2SEQ_DEMO:
        examples = stdlib_param_examples()
    else:
        raise UserError(f"no seq2seq corpus {name!r} built in (only {SEQ2SEQ_DEMO!r}); give --input=FILE.jsonl")
    tok, folder = get_tokenizer(tokenizer), Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=np.dtype(dtype_for_vocab(tok.vocab_size)).name,
                sep_id=tok.sep_id, seq2seq=True, source=f"{name}: {len(examples)} source/target pairs")
    for split in ("train", "val"):
        part = [(s, t) for s, t, sp in examples if sp == split]
        ids = np.array([i for pair in part for text in pair for i in tok.encode(text) + [tok.sep_id]], dtype=meta["dtype"])
        ids.tofile(folder / f"{split}.bin")
        meta.update({f"{split}_tokens": len(ids), f"{split}_docs": 2 * len(part), f"{split}_max_id": int(ids.max(initial=0))})
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: it marks the corpus complete
    if not quiet:
        print(f"wrote {folder}: {meta['train_docs'] // 2} train / {meta['val_docs'] // 2} val source/target pairs")
    return str(folder)

# -----------------------------------------------------------------------------

def check_args(args):
    """The command line's values, before any input is read or anything written."""
    if args.input and args.name is None:
        raise UserError("--input needs a --name for the output folder")
    if args.name is not None and (not args.name.strip() or "/" in args.name or args.name in (".", "..")):
        raise UserError(f"--name={args.name!r} must name one folder under --out_dir (no '/'), e.g. --name=mycorpus")
    if not args.out_dir.strip():
        raise UserError("--out_dir must not be empty; the default is data")
    if args.classify and args.seq2seq:
        raise UserError("--classify and --seq2seq make different corpora: give one of them")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers={args.workers} must be >= 1 (or left out: min(cpu count, 8) for large BPE jobs)")
    get_tokenizer(args.tokenizer)  # an unknown or unloadable tokenizer, named before any input is read


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tokenize text into data/NAME/{train,val}.bin + meta.json.")
    parser.add_argument("--classify", action="store_true", help="inputs are .jsonl lines {\"text\": ..., \"label\": ...}: "
                        "a labelled corpus for train.py --objective=classify")
    parser.add_argument("--seq2seq", action="store_true", help="inputs are .jsonl lines {\"source\": ..., \"target\": ...}: "
                        "a corpus for train.py --objective=seq2seq (an encoder-decoder)")
    parser.add_argument("--name", default=None, help="output folder under --out_dir (default: pystdlib)")
    parser.add_argument("--input", action="extend", nargs="+", default=[],
                        help="files, directories or globs; .jsonl gives one document per line ('text' field)")
    parser.add_argument("--tokenizer", default="bytes", help="bytes, a tiktoken encoding (gpt2, cl100k_base, ...), "
                        "or the path of a tiktoken-format BPE file such as LLaMA-3's tokenizer.model")
    parser.add_argument("--out_dir", default="data")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: min(cpu count, 8), or 1 for small/bytes jobs)")
    parser.add_argument("--quiet", action="store_true")
    parser.error = lambda msg: sys.exit(f"prepare.py: error: {msg}")  # one line, not usage + error
    args = parser.parse_args()
    try:
        check_args(args)
        if args.classify:
            prepare_classify(args.name or CLASSIFY_DEMO, args.input, args.tokenizer, args.out_dir, args.quiet)
        elif args.seq2seq:
            prepare_seq2seq(args.name or SEQ2SEQ_DEMO, args.input, args.tokenizer, args.out_dir, args.quiet)
        else:
            prepare(args.name or "pystdlib", args.input, args.tokenizer, args.out_dir, args.workers, args.quiet)
    except (UserError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
