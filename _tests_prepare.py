# tests for prepare.py (fragment, to be merged into test_model.py)
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare

REPO = Path(__file__).resolve().parent
TIKTOKEN_CACHE = REPO.parent / "shared" / "tiktoken-cache"  # the repo's ../shared, with gpt2 in it


def _docs(arr, sep_id):
    """Split a .bin array into its documents (each one separator-terminated)."""
    assert len(arr) == 0 or arr[-1] == sep_id
    cuts = np.flatnonzero(arr == sep_id)
    return np.split(arr, cuts + 1)[:-1]


def test_pystdlib_split_and_format(tmp_path):
    folder = Path(prepare.prepare(out_dir=tmp_path, quiet=True))
    assert folder == tmp_path / "pystdlib"
    meta = prepare.load_meta(folder)
    assert set(meta) == {"tokenizer", "vocab_size", "dtype", "sep_id", "train_tokens", "val_tokens",
                         "train_docs", "val_docs", "source"}
    assert (meta["tokenizer"], meta["vocab_size"], meta["sep_id"], meta["dtype"]) == ("bytes", 257, 256, "uint16")
    assert not list(folder.glob("*.tmp*"))

    files = prepare.pystdlib_files()
    assert files == sorted(files) and len(files) > 100
    for rel, _ in files:
        assert rel.endswith(".py")
        assert not {"test", "tests", "idlelib", "site-packages", "__pycache__"} & set(rel.split("/"))

    val_files = [f for i, f in enumerate(files) if i % 20 == 0]
    train_files = [f for i, f in enumerate(files) if i % 20 != 0]
    for split, expect in (("train", train_files), ("val", val_files)):
        arr = prepare.load_split(folder, split, meta)
        assert arr.dtype == np.uint16
        assert os.path.getsize(folder / f"{split}.bin") == 2 * meta[f"{split}_tokens"] == 2 * len(arr)
        assert int((arr == 256).sum()) == meta[f"{split}_docs"] == len(expect)
        assert arr.max() <= 256
        docs = _docs(np.asarray(arr), 256)
        # spot-check documents against their files: first, second and last of each split
        for k in (0, 1, -1):
            text = Path(expect[k][1]).read_bytes().decode("utf-8", errors="replace")
            assert docs[k][:-1].astype(np.uint8).tobytes() == text.encode("utf-8"), expect[k][0]


def _small_corpus(root):
    (root / "c").mkdir(parents=True)
    (root / "c" / "b.txt").write_text("second file\n")
    (root / "c" / "a.md").write_text("first file, ünïcode ✓\n")
    (root / "c" / "skip.bin").write_bytes(b"\x00\x01 not a text extension")
    (root / "c" / "d.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(25)) + "\n\n")
    (root / "z.txt").write_text("")  # an empty document is still a document
    # sorted by path: c/a.md, c/b.txt, c/d.jsonl (25 lines, in order), z.txt
    return ["first file, ünïcode ✓\n", "second file\n"] + [f"line {i}" for i in range(25)] + [""]


@pytest.mark.parametrize("workers", [1, 2])
def test_custom_corpus_roundtrip(tmp_path, workers):
    texts = _small_corpus(tmp_path / "in")
    folder = prepare.prepare("small", [str(tmp_path / "in" / "c"), str(tmp_path / "in" / "z.*")],
                             out_dir=tmp_path / "out", workers=workers, quiet=True)
    meta = prepare.load_meta(folder)
    tok = prepare.get_tokenizer_from_meta(meta)
    train, val = (np.fromfile(Path(folder) / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val"))
    assert (meta["train_docs"], meta["val_docs"]) == (26, 2)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    val_docs, train_docs = _docs(val, tok.sep_id), _docs(train, tok.sep_id)
    # put the documents back in input order: index i % 20 == 0 came from val
    docs = [val_docs.pop(0) if i % 20 == 0 else train_docs.pop(0) for i in range(len(texts))]
    assert [tok.decode(d.tolist()) for d in docs] == texts
    assert tok.decode(train.tolist()) == "".join(t for i, t in enumerate(texts) if i % 20)


def test_dtype_choice():
    assert prepare.dtype_for_vocab(257) == np.uint16
    assert prepare.dtype_for_vocab(65536) == np.uint16
    assert prepare.dtype_for_vocab(65537) == np.uint32
    assert prepare.dtype_for_vocab(200019) == np.uint32


def test_bytes_tokenizer():
    tok = prepare.get_tokenizer("bytes")
    s = "héllo ✓ wörld"
    assert tok.encode(s) == list(s.encode("utf-8"))
    assert tok.decode(tok.encode(s) + [256, 300]) == s  # separator and out-of-range ids dropped
    with pytest.raises(ValueError, match="gpt2"):  # an unknown name lists the valid ones
        prepare.get_tokenizer("no-such-tokenizer")


def test_tiktoken_gpt2_roundtrip(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    if TIKTOKEN_CACHE.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    try:
        tok = prepare.get_tokenizer("gpt2")
    except RuntimeError as e:
        pytest.skip(f"gpt2 encoding not available offline: {e}")
    assert (tok.vocab_size, tok.sep_id) == (50257, 50256)
    s = "def f(x):\n    return x ** 2  # <|endoftext|> stays text ✓\n"
    ids = tok.encode(s)
    assert 50256 not in ids and tok.decode(ids) == s
    assert tok.decode(ids + [50256, 70000]) == s + "<|endoftext|>"
    # a small corpus through the worker pool
    texts = _small_corpus(tmp_path / "in")
    folder = prepare.prepare("g", [str(tmp_path / "in")], tokenizer="gpt2", out_dir=tmp_path / "out",
                             workers=2, quiet=True)
    meta = prepare.load_meta(folder)
    assert (meta["tokenizer"], meta["dtype"], meta["sep_id"]) == ("gpt2", "uint16", 50256)
    train = prepare.load_split(folder, "train")
    assert int((train == 50256).sum()) == meta["train_docs"] == 26
    assert tok.decode(train.tolist()) == "<|endoftext|>".join(t for i, t in enumerate(texts) if i % 20) + "<|endoftext|>"


def test_tiktoken_offline_message(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load
    import tiktoken.registry

    def no_network(blobpath):
        raise ConnectionError(f"simulated: no network for {blobpath}")

    # an empty cache and no network, whatever this machine really has; and forget any
    # encoding object tiktoken already built in this process
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    with pytest.raises(RuntimeError) as e:
        prepare.get_tokenizer("cl100k_base")
    msg = str(e.value)
    assert "cl100k_base" in msg and "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer=bytes" in msg


def test_missing_input_and_failed_build(tmp_path):
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        prepare.prepare("x", [missing], out_dir=tmp_path, quiet=True)
    # the CLI says the same in one line, without a traceback
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--name=x", f"--input={missing}",
                        f"--out_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and missing in r.stderr and "Traceback" not in r.stderr
    # a build that fails half-way leaves no corpus that looks complete (meta.json is the marker)
    (tmp_path / "ok.txt").write_text("fine")
    prepare.prepare("y", [str(tmp_path / "ok.txt")], out_dir=tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "y" / "meta.json").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"no_text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare.prepare("y", [str(tmp_path / "ok.txt"), str(tmp_path / "bad.jsonl")],
                        out_dir=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in (tmp_path / "out" / "y").iterdir()) == ["train.bin", "val.bin"]
