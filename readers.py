"""
The documents prepare.py tokenizes, read one at a time in a fixed order, so memory stays bounded whatever
the corpus size:

  text and code files    one file, one document (folders: their TEXT_EXTS files, recursively)
  .jsonl .jsonl.gz .jsonl.zst   one line, one document: its `text_field` string
  .parquet               one row, one document: its `text_field` column, read a batch of rows at a time
  a Hugging Face dataset one record, one document, streamed (load_dataset(..., streaming=True)): a hub
                         name, or a local folder of data files

pyarrow (Parquet), zstandard (.zst) and datasets (Hugging Face) are optional: imported when an input
needs them, and named with their pip command when missing. Every reader yields (text, nbytes), nbytes
being how far into the input files the document took the reader (0 for a streamed dataset): progress.
"""
import glob
import gzip
import io
import os
from pathlib import Path

from common import UserError, need, read_jsonl

# taken when an --input is a directory (files named directly are always taken)
TEXT_EXTS = {".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp",
             ".js", ".ts", ".java", ".go", ".rs", ".sh", ".html", ".css", ".toml", ".yaml", ".yml",
             ".jsonl"}
RECORD_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # a document per line or row, not per file


def expand_inputs(inputs):
    """Files, directories (walked for TEXT_EXTS and RECORD_EXTS files) and globs -> file paths, in the order the
    inputs are given (a directory's files and a glob's matches sorted by path), each once; ~ is expanded."""
    files, exts = {}, tuple(TEXT_EXTS) + RECORD_EXTS
    for inp in map(os.path.expanduser, inputs):
        matches = [inp] if os.path.exists(inp) else sorted(glob.glob(inp, recursive=True))
        if not matches:
            raise UserError(f"input {inp!r} matches no file or directory")
        for m in matches:
            if os.path.isdir(m):
                found = [p for p in Path(m).rglob("*") if p.is_file() and p.name.lower().endswith(exts)
                         and not any(part.startswith(".") for part in p.relative_to(m).parts)]
                if not found:
                    raise UserError(f"input directory {inp!r} holds no text files "
                                    f"({' '.join(sorted(TEXT_EXTS) + list(RECORD_EXTS[1:]))})")
                files.update(dict.fromkeys(sorted((str(p.resolve()) for p in found), key=lambda f: Path(f).as_posix())))
            else:
                files.setdefault(str(Path(m).resolve()))
    return list(files)


def check_packages(files):
    """The optional packages these files need, imported now: a missing one is named before anything is written."""
    for ext, module, pip in ((".parquet", "pyarrow.parquet", "pyarrow"), (".zst", "zstandard", "zstandard")):
        if any(f.endswith(ext) for f in files):
            need(module, pip, f"reading {ext} files")


def iter_documents(files, text_field="text"):
    """Yield (text, nbytes) one document at a time: a whole file, one line of JSON lines, one Parquet row."""
    for f in files:
        if f.endswith(RECORD_EXTS[:3]):
            yield from jsonl_documents(f, text_field)
        elif f.endswith(".parquet"):
            yield from parquet_documents(f, text_field)
        else:
            data = Path(f).read_bytes()
            yield data.decode("utf-8", errors="replace"), len(data)


def jsonl_documents(path, field):
    """The `field` string of each line of a .jsonl file, plain or compressed (gzip, zstd: streamed)."""
    with open(path, "rb") as raw:
        if path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        elif path.endswith(".zst"):  # read_across_frames: zstd files are often many frames back to back
            zstd = need("zstandard", "zstandard", "reading .zst files")
            stream = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        else:
            stream = raw
        done = 0
        for lineno, rec, _ in read_jsonl(path, stream):
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a {field!r} string (--text_field)")
            yield text, raw.tell() - done  # compressed bytes read so far: the decompressor reads ahead a little
            done = raw.tell()


def parquet_documents(path, column):
    """The `column` string of each row of a Parquet file, a batch of rows in memory at a time."""
    pq = need("pyarrow.parquet", "pyarrow", "reading .parquet files")
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types; the user needs one line
        raise UserError(f"{path} is not a Parquet file ({type(e).__name__}: {str(e)[:100]})") from None
    if column not in f.schema_arrow.names:
        raise UserError(f"{path} has no column {column!r}; its columns: {', '.join(f.schema_arrow.names)} "
                        f"(--text_field)")
    n, size, row = f.metadata.num_rows, os.path.getsize(path), 0
    for batch in f.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row}: column {column!r} holds {type(text).__name__}, not a string")
            yield text, (row + 1) * size // n - row * size // n
            row += 1


def open_hf_dataset(name, config=None, split="train"):
    """A Hugging Face dataset as a stream (nothing downloaded ahead): a hub name, or a local folder."""
    datasets = need("datasets", "datasets", "--hf_dataset")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # not found, offline, a wrong config or split: one line, the library's own words
        cause = f"{type(e).__name__}: {str(e).strip()}".splitlines()[0][:300]
        raise UserError(f"--hf_dataset={name} (config {config}, split {split}) cannot be opened: {cause}") from None


def hf_documents(ds, name, field):
    """The `field` string of each record of a streamed dataset."""
    for row, rec in enumerate(ds):
        text = rec.get(field)
        if not isinstance(text, str):
            columns = ", ".join(rec) if field not in rec else f"{field!r} is {type(text).__name__}"
            raise UserError(f"--hf_dataset={name}: record {row} has no {field!r} string ({columns}); set --text_field")
        yield text, 0
