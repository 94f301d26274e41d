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
                pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
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

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tokenize text into data/NAME/{train,val}.bin + meta.json.")
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
        prepare(args.name or "pystdlib", args.input, args.tokenizer, args.out_dir, args.workers, args.quiet)
    except (RuntimeError, ValueError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
