"""
Data: prepare.py (the built-in corpus, custom corpora, every input kind, tokenizers, --append, workers), the
batches of each objective (MLM masking, NSP pairs, T5's span corruption, seq2seq pairs) and the demo tasks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data
import prepare
import train

from conftest import REPO, _hf_tokenizer_file, split_of, tiny_cfg


def _docs(arr, sep_id):
    """Split a .bin array into its documents (each one separator-terminated)."""
    assert len(arr) == 0 or arr[-1] == sep_id
    cuts = np.flatnonzero(arr == sep_id)
    return np.split(arr, cuts + 1)[:-1]


def _small_corpus(root):
    (root / "c").mkdir(parents=True)
    (root / "c" / "b.txt").write_text("second file\n")
    (root / "c" / "a.md").write_text("first file, ünïcode ✓\n")
    (root / "c" / "skip.bin").write_bytes(b"\x00\x01 not a text extension")
    (root / "c" / "d.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(25)) + "\n\n")
    (root / "z.txt").write_text("")  # an empty document is still a document
    # sorted by path: c/a.md, c/b.txt, c/d.jsonl (25 lines, in order), z.txt
    return ["first file, ünïcode ✓\n", "second file\n"] + [f"line {i}" for i in range(25)] + [""]


def _in_order(folder):
    """A prepared corpus's documents in input order (the split undone), each with its separator, and the
    tokenizer: the split rule comes from meta.json, as prepare.py applied it."""
    meta = data.load_meta(folder)
    tok = prepare.get_tokenizer_from_meta(meta)
    docs = {s: _docs(np.asarray(data.load_split(folder, s, meta)), tok.sep_id) for s in ("train", "val")}
    is_val, out, n_val = prepare.split_rule(meta["val_fraction"], meta["val_docs_limit"]), [], 0
    for i in range(meta["train_docs"] + meta["val_docs"]):
        v = is_val(i, n_val)
        n_val += v
        out.append(docs["val" if v else "train"].pop(0))
    assert not docs["train"] and not docs["val"]
    return out, tok


ODD_TEXTS = ["first, ünïcode ✓\n", "", 'quotes " and \\ backslash\r\n', "x" * 3000, "tab\tend"] + \
            [f"doc {i}\n" for i in range(20)]


def _write_input(kind, texts, root):
    """texts as an input of `kind` in the folder root, the text in the field or column "body", two files of
    records (in sorted order); returns prepare's inputs and keyword arguments."""
    root.mkdir(parents=True)
    if kind == "files":
        for i, t in enumerate(texts):
            (root / f"{i:03d}.txt").write_bytes(t.encode())
        return [str(root)], {}
    halves = texts[:10], texts[10:]
    lines = ["".join(json.dumps({"n": i, "body": t}) + "\n" for i, t in enumerate(h)).encode() for h in halves]
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow", reason="pyarrow is optional: pip install pyarrow")
        import pyarrow.parquet as pq
        for j, h in enumerate(halves):  # small row groups: several reads per file
            pq.write_table(pa.table({"n": list(range(len(h))), "body": h}), root / f"{j}.parquet", row_group_size=4)
    elif kind == "zst":
        zstd = pytest.importorskip("zstandard", reason="zstandard is optional: pip install zstandard")
        for j, raw in enumerate(lines):  # two frames per file, as concatenated .zst files have
            c = zstd.ZstdCompressor()
            (root / f"{j}.jsonl.zst").write_bytes(c.compress(raw[:50]) + c.compress(raw[50:]))
    elif kind == "hf":
        pytest.importorskip("datasets", reason="datasets is optional: pip install datasets")
        (root / "data").mkdir()
        for j, raw in enumerate(lines):
            (root / "data" / f"train-{j}.jsonl").write_bytes(raw)
        return [], dict(hf_dataset=str(root))
    else:
        import gzip
        for j, raw in enumerate(lines):
            (root / f"{j}.jsonl{'.gz' if kind == 'gz' else ''}").write_bytes(gzip.compress(raw) if kind == "gz"
                                                                              else raw)
    return [str(root)], {}


# ------------------------------------------------------------------------------------------------
# prepare.py: the built-in corpus, custom corpora, input kinds, the split, workers, --append

def test_pystdlib_split_and_format(tmp_path):
    folder = Path(prepare.prepare(out_dir=tmp_path, quiet=True))
    assert folder == tmp_path / "pystdlib"
    meta = data.load_meta(folder)
    assert set(meta) == {"tokenizer", "vocab_size", "dtype", "sep_id", "train_tokens", "val_tokens",
                         "train_docs", "val_docs", "train_max_id", "val_max_id", "train_bytes", "val_bytes", "source",
                         "inputs", "val_fraction", "val_docs_limit"}
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
        arr = data.load_split(folder, split, meta)
        assert arr.dtype == np.uint16
        assert os.path.getsize(folder / f"{split}.bin") == 2 * meta[f"{split}_tokens"] == 2 * len(arr)
        assert int((arr == 256).sum()) == meta[f"{split}_docs"] == len(expect)
        assert meta[f"{split}_max_id"] == int(arr.max())  # recorded once, so train.py never scans the data
        assert meta[f"{split}_bytes"] == sum(len(Path(f).read_bytes().decode("utf-8", errors="replace").encode())
                                             for _, f in expect)
        assert arr.max() <= 256
        docs = _docs(np.asarray(arr), 256)
        # spot-check documents against their files: first, second and last of each split
        for k in (0, 1, -1):
            text = Path(expect[k][1]).read_bytes().decode("utf-8", errors="replace")
            assert docs[k][:-1].astype(np.uint8).tobytes() == text.encode("utf-8"), expect[k][0]


@pytest.mark.parametrize("workers", [1, 2])
def test_custom_corpus_roundtrip(tmp_path, workers):
    texts = _small_corpus(tmp_path / "in")
    folder = prepare.prepare("small", [str(tmp_path / "in" / "c"), str(tmp_path / "in" / "z.*")],
                             out_dir=tmp_path / "out", workers=workers, quiet=True)
    meta = data.load_meta(folder)
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


def test_missing_input_and_failed_build(tmp_path):
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(common.UserError, match="nope"):
        prepare.prepare("x", [missing], out_dir=tmp_path, quiet=True)
    # the CLI says the same in one line, without a traceback
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--name=x", f"--input={missing}",
                        f"--out_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and missing in r.stderr and "Traceback" not in r.stderr
    # a build that fails half-way leaves no corpus that looks complete (meta.json is the marker)
    (tmp_path / "ok.txt").write_text("fine")
    prepare.prepare("y", [str(tmp_path / "ok.txt")], out_dir=tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "y" / "meta.json").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n' * 25 + '{"no_text": 1}\n')  # past the first 20 documents
    with pytest.raises(ValueError, match="bad.jsonl:26"):
        prepare.prepare("y", [str(tmp_path / "ok.txt"), str(tmp_path / "bad.jsonl")],
                        out_dir=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in (tmp_path / "out" / "y").iterdir()) == ["train.bin", "val.bin"]


@pytest.mark.parametrize("kind", ["files", "jsonl", "gz", "zst", "parquet", "hf"])
def test_every_input_kind_roundtrips(tmp_path, kind):
    """Text files, JSON lines (plain, gzip, zstd), Parquet and a streamed Hugging Face dataset (a local one):
    decoding the .bin files gives back the texts in input order, each followed by the separator."""
    inputs, kw = _write_input(kind, ODD_TEXTS, tmp_path / "in")
    field = {} if kind == "files" else {"text_field": "body"}
    folder = prepare.prepare("c", inputs, out_dir=tmp_path / "out", quiet=True, val_fraction=0.25, **kw, **field)
    docs, tok = _in_order(folder)
    assert [tok.decode(d[:-1].tolist()) for d in docs] == ODD_TEXTS and all(d[-1] == tok.sep_id for d in docs)
    meta = data.load_meta(folder)
    assert (meta["val_docs"], meta["train_docs"], meta["val_fraction"]) == (7, 18, 0.25)  # documents 0, 4, ... 24
    assert meta["inputs"] == ([f"hf:{tmp_path / 'in'}:train"] if kind == "hf" else [str(tmp_path / "in")])
    if kind != "files":  # the field is named when it is missing
        with pytest.raises(common.UserError, match="'text'"):
            prepare.prepare("d", inputs, out_dir=tmp_path / "out", quiet=True, **kw)
    if kind == "hf":
        with pytest.raises(common.UserError, match="nope") as e:
            prepare.prepare("d", [], out_dir=tmp_path / "out", quiet=True, hf_split="nope", **kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind,module,pip", [("parquet", "pyarrow.parquet", "pyarrow"),
                                             ("zst", "zstandard", "zstandard"),
                                             ("hf", "datasets", "datasets"), ("json", "tokenizers", "tokenizers")])
def test_optional_packages_named_before_anything_is_written(tmp_path, monkeypatch, kind, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    inputs = {"parquet": ["a.parquet"], "zst": ["a.jsonl.zst"]}.get(kind, ["tokenizer.json"])
    kw = dict(hf_dataset=str(tmp_path)) if kind == "hf" else \
        dict(tokenizer=str(tmp_path / "tokenizer.json")) if kind == "json" else {}
    with pytest.raises(common.UserError, match=f"pip install {pip}"):
        prepare.prepare("x", [str(tmp_path / i) for i in inputs] if kind != "hf" else [], out_dir=tmp_path / "out",
                        quiet=True, **kw)
    assert not (tmp_path / "out").exists()


def test_split_rule():
    rule = prepare.split_rule(0.05)  # the built-in corpus's rule, exactly, however far
    assert all(rule(i, 0) == (i % 20 == 0) for i in range(100_000))
    assert [i for i in range(30) if prepare.split_rule(0.1)(i, 0)] == [0, 10, 20]
    assert [i for i in range(10) if prepare.split_rule(0.3)(i, 0)] == [0, 4, 7]  # floor(0.3 i) steps up
    capped, n, taken = prepare.split_rule(0.5, val_docs=3), 0, []
    for i in range(20):
        if capped(i, n):
            n, taken = n + 1, taken + [i]
    assert taken == [0, 2, 4]


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenizing_workers_keep_order(tmp_path, gpt2, monkeypatch, workers):
    """Chunks far smaller than the corpus, tokenized by 1 or 2 worker processes: the files hold exactly each document's
    encode_ordinary ids (text that looks like a special token, or is not valid UTF-8, included) and its separator."""
    texts = [f"def f_{i}(x):\n    return x * {i}  # ✓ {'<|endoftext|>' if i % 7 == 0 else ''}\n" * (i % 13 + 1)
             for i in range(300)] + ["lone surrogate \ud800 here"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 300)
    folder = prepare.prepare("t", [str(tmp_path / "in.jsonl")], tokenizer="gpt2", out_dir=tmp_path, workers=workers,
                             quiet=True)
    docs, _ = _in_order(folder)
    assert [d.tolist() for d in docs] == [gpt2.encode(t) + [50256] for t in texts]


def test_append_equals_one_prepare(tmp_path, monkeypatch):
    """--append: the same files and meta.json as one prepare over all the inputs, the validation limit reached
    across the runs; a failed or interrupted append leaves the corpus as its meta.json describes it."""
    path = {}
    for name, n in (("a", 30), ("b", 25), ("c", 5)):
        path[name] = tmp_path / f"{name}.jsonl"
        path[name].write_text("".join(json.dumps({"text": f"{name} {i} " * i}) + "\n" for i in range(n)))
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 10)  # a chunk per document: a failing input fails after some writes
    opts = dict(out_dir=tmp_path / "out", quiet=True)
    one = Path(prepare.prepare("one", [str(path["a"]), str(path["b"])], val_fraction=0.1, val_docs=4, **opts))
    two = Path(prepare.prepare("two", [str(path["a"])], val_fraction=0.1, val_docs=4, **opts))
    prepare.prepare("two", [str(path["b"])], append=True, **opts)

    def same(x, y):
        for f in ("train.bin", "val.bin"):
            assert (x / f).read_bytes() == (y / f).read_bytes(), f
        assert json.loads((x / "meta.json").read_text()) == json.loads((y / "meta.json").read_text())

    same(one, two)
    assert data.load_meta(two)["val_docs"] == 4  # documents 0, 10, 20 (first run), 30 (second); then the limit
    with open(two / "train.bin", "ab") as f:
        f.write(b"junk!!")  # what a killed --append leaves
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' * 3 + '{"txt": 1}\n')
    with pytest.raises(common.UserError, match="bad.jsonl:4"):
        prepare.prepare("two", [str(path["c"]), str(tmp_path / "bad.jsonl")], append=True, **opts)
    same(one, two)
    prepare.prepare("two", [str(path["c"])], append=True, **opts)
    same(Path(prepare.prepare("three", [str(path["a"]), str(path["b"]), str(path["c"])], val_fraction=0.1,
                              val_docs=4, **opts)), two)
    with pytest.raises(common.UserError, match="val_fraction=0.1, this run asks for 0.5"):
        prepare.prepare("two", [str(path["c"])], append=True, val_fraction=0.5, **opts)
    with pytest.raises(common.UserError, match="drop --append"):
        prepare.prepare("none", [str(path["c"])], append=True, **opts)


def test_append_keeps_the_input_order_and_expands_home(tmp_path, monkeypatch):
    """--input order is kept (not sorted across inputs), so a prepare of [z, a] equals a prepare of [z] and an
    --append of [a]; ~ in an input (README's --input=~/src/project) is the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("z", "a"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(30)))
    opts = dict(out_dir=tmp_path / "out", quiet=True)
    one = Path(prepare.prepare("one", ["~/z.jsonl", "~/a.jsonl"], **opts))
    two = Path(prepare.prepare("two", ["~/z.jsonl"], **opts))
    prepare.prepare("two", ["~/a.jsonl"], append=True, **opts)
    for f in ("train.bin", "val.bin"):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    ids = np.fromfile(one / "train.bin", np.uint16)
    assert bytes(ids[:3].tolist()) == b"z 1"  # z's documents first (document 0 went to validation)
    assert data.load_meta(one)["inputs"] == [str(tmp_path / "z.jsonl"), str(tmp_path / "a.jsonl")]


def test_progress_line(tmp_path, monkeypatch, capsys):
    """A long input reports documents, tokens, MB/s and an ETA on stderr, a line every few seconds."""
    monkeypatch.setattr(prepare, "REPORT_AFTER", 0)  # the first line at once; the next one 5 s later at the earliest
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": "x" * 1000}) + "\n" for _ in range(50)))
    prepare.prepare("p", [str(tmp_path / "in.jsonl")], out_dir=tmp_path, quiet=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: 1 docs, 1,001 tokens, ") and " MB/s, " in err[0], err
    assert "%, ETA " in err[0]


# ------------------------------------------------------------------------------------------------
# tokenizers: bytes, tiktoken, a BPE file, a Hugging Face tokenizer.json

def test_bytes_tokenizer():
    tok = prepare.get_tokenizer("bytes")
    s = "héllo ✓ wörld"
    assert tok.encode(s) == list(s.encode("utf-8"))
    assert tok.decode(tok.encode(s) + [256, 300]) == s  # separator and out-of-range ids dropped
    with pytest.raises(ValueError, match="gpt2"):  # an unknown name lists the valid ones
        prepare.get_tokenizer("no-such-tokenizer")


def test_tiktoken_gpt2_roundtrip(tmp_path, gpt2):
    tok = gpt2
    assert (tok.vocab_size, tok.sep_id) == (50257, 50256)
    s = "def f(x):\n    return x ** 2  # <|endoftext|> stays text ✓\n"
    ids = tok.encode(s)
    assert 50256 not in ids and tok.decode(ids) == s
    assert tok.decode(ids + [50256, 70000]) == s + "<|endoftext|>"
    # a small corpus through the worker pool
    texts = _small_corpus(tmp_path / "in")
    folder = prepare.prepare("g", [str(tmp_path / "in")], tokenizer="gpt2", out_dir=tmp_path / "out",
                             workers=2, quiet=True)
    meta = data.load_meta(folder)
    assert (meta["tokenizer"], meta["dtype"], meta["sep_id"]) == ("gpt2", "uint16", 50256)
    train = data.load_split(folder, "train")
    assert int((train == 50256).sum()) == meta["train_docs"] == 26
    assert meta["train_bytes"] == sum(len(t.encode("utf-8")) for i, t in enumerate(texts) if i % 20)  # bits per byte
    assert tok.decode(train.tolist()) == "<|endoftext|>".join(t for i, t in enumerate(texts)
                                                              if i % 20) + "<|endoftext|>"


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
    with pytest.raises(common.UserError) as e:
        prepare.get_tokenizer("cl100k_base")
    msg = str(e.value)
    assert "cl100k_base" in msg and "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer=bytes" in msg


def test_tokenizer_from_a_bpe_file(tmp_path, data_root):
    """--tokenizer=PATH: a tiktoken-format BPE file (LLaMA-3's tokenizer.model is one); vocab_size follows it."""
    import base64
    ranks = {bytes([i]): i for i in range(256)} | {b"de": 256, b"def": 257, b" s": 258, b"se": 259}
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    tok = prepare.get_tokenizer(str(path))
    assert (tok.vocab_size, tok.sep_id, tok.name) == (261, 260, str(path))
    assert tok.encode("def self") == [257, 258, 101, 108, 102] and tok.decode(tok.encode("é def x")) == "é def x"
    texts = [f"def self_{i}(x):\n    return x + {i}\n" * 20 for i in range(30)]
    for i, t in enumerate(texts):
        (tmp_path / "src" / f"{i:02d}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i:02d}.py").write_text(t)
    folder = prepare.prepare("bpe", [str(tmp_path / "src")], tokenizer=str(path), out_dir=tmp_path / "data", quiet=True)
    meta = data.load_meta(folder)
    assert (meta["tokenizer"], meta["vocab_size"], meta["sep_id"]) == (str(path), 261, 260)
    s = train.train(tiny_cfg(tmp_path / "data", tmp_path / "out", dataset="bpe", block_size=32, max_iters=4,
                             eval_interval=4, warmup_iters=1))
    assert s["model"].cfg.vocab_size == 261  # the model's vocabulary follows the tokenizer
    (tmp_path / "bad.model").write_text("not a bpe file\n")
    with pytest.raises(common.UserError, match="not a tiktoken BPE file"):
        prepare.get_tokenizer(str(tmp_path / "bad.model"))


def test_tokenizer_json(tmp_path):
    """--tokenizer=PATH/tokenizer.json: a Hugging Face tokenizer; the separator is its eos_token, no other
    special token is added, and the model's vocab_size follows it."""
    ref, path = _hf_tokenizer_file(tmp_path / "tok")
    tok = prepare.get_tokenizer(str(path))
    assert (tok.name, tok.vocab_size, tok.sep_id) == (str(path), ref.get_vocab_size(True), 2)
    s = "def ünïcode(self):\n    return 'ok ✓'\n"
    assert tok.encode(s) == ref.encode(s).ids and tok.decode(tok.encode(s)) == s
    for i, t in enumerate(ODD_TEXTS):
        (tmp_path / "src" / f"{i:02d}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i:02d}.py").write_text(t * 10)
    folder = prepare.prepare("h", [str(tmp_path / "src")], tokenizer=str(path), out_dir=tmp_path / "data", quiet=True)
    docs, tok2 = _in_order(folder)
    assert [tok2.decode(d.tolist()) for d in docs] == [t * 10 + "</s>" for t in ODD_TEXTS]
    s = train.train(tiny_cfg(tmp_path / "data", tmp_path / "out", dataset="h", block_size=32, max_iters=2,
                             eval_interval=2, warmup_iters=1))
    assert s["model"].cfg.vocab_size == tok.vocab_size and np.isfinite(s["train_losses"]).all()
    _hf_tokenizer_file(tmp_path / "noeos", eos="<none>")
    (tmp_path / "noeos" / "tokenizer.json").write_text(
        (tmp_path / "noeos" / "tokenizer.json").read_text().replace("</s>", "<x>"))
    with pytest.raises(common.UserError, match="no end-of-document token"):
        prepare.get_tokenizer(str(tmp_path / "noeos" / "tokenizer.json"))


def test_newline_table_tiktoken(gpt2):
    tok = gpt2
    table = data.newline_tokens({"tokenizer": "gpt2", "vocab_size": 50257, "sep_id": 50256})
    ids = tok.encode("def f(x):\n    return x\n\n")
    assert [bool(table[i]) for i in ids] == ["\n" in tok.decode([i]) for i in ids] and table[ids].sum() == 2
    assert table.sum() >= 2 and not table[50256]


# ------------------------------------------------------------------------------------------------
# encoder objectives (BERT): MLM masking, NSP pairs, the classification demo task

@pytest.fixture(scope="session")
def lines_corpus(tmp_path_factory):
    """Documents whose every line names its document and line number ("d07 l0012 xx..\\n", varied
    lengths), so a pair's segments can be traced back; one document has no newline at all."""
    root = tmp_path_factory.mktemp("lines")
    rng = np.random.default_rng(0)
    docs = ["".join(f"d{k:02d} l{i:04d} {'x' * int(rng.integers(0, 30))}\n" for i in range(int(rng.integers(5, 60))))
            for k in range(41)] + ["d99 " + "y" * 300]
    (root / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    folder = prepare.prepare("lines", [str(root / "in.jsonl")], out_dir=root, quiet=True)
    meta = data.load_meta(folder)
    return folder, meta, [d for i, d in enumerate(docs) if i % prepare.VAL_EVERY]  # the training documents


def _unmask(b, base):
    """The pair before masking: the original ids at chosen positions, and the chosen mask."""
    chosen = b["targets"] != -1
    return np.where(chosen, b["targets"], b["idx"]), chosen


def test_mlm_masking_statistics(data_root):
    meta = data.load_meta(data_root / "pystdlib")
    c = split_of("mlm_nsp", data_root / "pystdlib", "train", 64)
    base, sp = meta["vocab_size"], data.special_ids(meta["vocab_size"])
    b = data.mlm_nsp_batch(c, range(3000), 0, 1, 7)
    orig, chosen = _unmask(b, base)
    real = orig < base  # not [CLS]/[SEP]/[PAD]
    assert not (chosen & ~real).any() and not (chosen & ~b["attn_mask"]).any()  # specials, pads never chosen
    assert (b["targets"][~chosen] == -1).all() and (b["idx"][~chosen] == orig[~chosen]).all()
    assert abs(chosen.sum() / real.sum() - 0.15) < 0.01
    x, o = b["idx"][chosen], orig[chosen]
    masked, kept, rand = (x == sp.mask).mean(), (x == o).mean(), ((x != sp.mask) & (x != o)).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(rand - 0.1) < 0.02, (masked, kept, rand)
    assert x[x != sp.mask].max() < base and meta["sep_id"] not in x[x != o]  # random tokens: base vocab, no separator
    # dynamic and stateless: a row is a pure function of (seed, step, row)
    again = data.mlm_nsp_batch(c, range(2990, 3000), 0, 1, 7)
    assert all(np.array_equal(again[k], b[k][2990:]) for k in b)
    other = data.mlm_nsp_batch(c, range(2990, 3000), 0, 1, 8)
    assert not np.array_equal(other["idx"], again["idx"])
    ev = data.mlm_nsp_batch(c, range(5), 5)
    assert all(np.array_equal(ev[k], data.mlm_nsp_batch(c, range(5), 5)[k]) for k in ev)


def test_nsp_pairs(lines_corpus):
    folder, meta, docs = lines_corpus
    base, sp, T = meta["vocab_size"], data.special_ids(meta["vocab_size"]), 96
    c = split_of("mlm_nsp", folder, "train", T)
    b = data.mlm_nsp_batch(c, range(2000), 0, 3, 0)
    assert abs(b["labels"].mean() - 0.5) < 0.03
    orig, _ = _unmask(b, base)
    for row, types, label in zip(orig, b["token_type_ids"], b["labels"]):
        seps = np.flatnonzero(row == sp.sep)
        assert row[0] == sp.cls and len(seps) == 2 and (row[seps[1] + 1:] == sp.pad).all()
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:seps[1] + 1] == 1).all()
        assert (types[seps[1] + 1:] == 0).all()
        a, bb = (bytes(row[1:seps[0]].tolist()).decode(), bytes(row[seps[0] + 1:seps[1]].tolist()).decode())
        assert a and bb and seps[1] + 1 <= T
        assert a.startswith("d"), a  # A starts at a line start
        doc_a = int(a[1:3]) if len(a) >= 3 else None
        home = [d for d in docs if a in d]
        assert home, a
        if label == 0:  # IsNext: B is the text right after A, in A's document
            assert any(a + bb in d for d in home), (a, bb)
            if "\n" in (a + bb)[:-1]:  # the cut is at a line boundary where there is one
                assert a.endswith("\n"), (a, bb)
        else:  # NotNext: B starts a line of another document
            assert bb.startswith("d"), (a, bb)
            assert doc_a is None or len(bb) < 3 or int(bb[1:3]) != doc_a, (a, bb)


def test_stdlib_modules_demo_task(tmp_path):
    ex = prepare.stdlib_module_examples()
    labels = {lab for _, lab, _ in ex}
    files = prepare.pystdlib_files()
    tops = [rel.split("/")[0] for rel, _ in files if "/" in rel]
    # packages of 5+ files
    assert labels == {p for p in tops if tops.count(p) >= 5} and {s for *_, s in ex} == {"train", "val"}
    # ~2,000 (Python 3.11: 2,102)
    assert all(0 < len(t.encode()) <= 126 for t, _, _ in ex) and sum(s == "val" for *_, s in ex) > 1500
    val_text = "".join(Path(f).read_bytes().decode("utf-8", errors="ignore") for i, (_, f) in enumerate(files)
                       if i % 20 == 0)
    assert all(t in val_text for t, _, s in ex if s == "val")  # split by file like pystdlib's 20th-document rule
    folder = prepare.prepare(prepare.CLASSIFY_DEMO, out_dir=tmp_path, quiet=True)
    meta = data.load_meta(folder)
    assert meta["labels"] == sorted(labels) and meta["val_docs"] == sum(s == "val" for *_, s in ex)
    c = split_of("classify", folder, "val", 64)
    b = data.classify_batch(c, range(meta["val_docs"] - 2, meta["val_docs"] + 2), 0)
    assert b["labels"][2:].tolist() == [-1, -1] and (b["labels"][:2] >= 0).all()  # past the end: ignored
    sp = data.special_ids(meta["vocab_size"])
    assert (b["idx"][:, 0] == sp.cls).all() and (b["idx"] == sp.sep).sum(1).tolist() == [1] * 4
    first = [t for t, _, s in ex if s == "val"][0]
    c0 = data.classify_batch(dict(c, T=300), [0], 0)
    n = len(first.encode())
    assert bytes(c0["idx"][0][1:1 + n].tolist()).decode() == first and c0["idx"][0][1 + n] == sp.sep
    with pytest.raises(ValueError, match="no labels"):
        data.labelled_corpus(folder, "val", {k: v for k, v in meta.items() if k != "labels"})


def test_prepare_classify_jsonl(tmp_path):
    lines = [{"text": f"item {i}", "label": ["a", "b", 3][i % 3]} for i in range(45)]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--classify", "--name=x",
                        f"--input={tmp_path / 'x.jsonl'}", f"--out_dir={tmp_path}", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = data.load_meta(tmp_path / "x")
    assert meta["labels"] == ["3", "a", "b"] and (meta["train_docs"], meta["val_docs"]) == (42, 3)
    assert np.load(tmp_path / "x" / "val_labels.npy").tolist() == [1, 0, 2]  # lines 0, 20, 40: "a", 3, "b"
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"label": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare.prepare_classify("bad", [str(tmp_path / "bad.jsonl")], out_dir=tmp_path, quiet=True)


# ------------------------------------------------------------------------------------------------
# the encoder-decoder's data: T5's span corruption, seq2seq pairs, the demo task

def _runs(row):
    """The lengths of the runs of True in a boolean row."""
    edges = np.flatnonzero(np.diff(np.r_[0, row.astype(np.int8), 0]))
    return edges[1::2] - edges[::2]


def test_span_corruption_statistics(data_root):
    meta = data.load_meta(data_root / "pystdlib")
    base, sp, T = meta["vocab_size"], data.special_ids(meta["vocab_size"]), 128
    raw, D = data.span_lengths(T)
    noise = round(0.15 * raw)
    spans = round(noise / 3)
    assert (raw, D) == (141, noise + spans + 1) and raw - noise + spans + 1 == T
    masks = np.stack([data.noise_mask(raw, np.random.default_rng(i)) for i in range(2000)])
    # non-noise first
    assert (masks.sum(1) == noise).all() and abs(masks.mean() - 0.15) < 0.002 and not masks[:, 0].any()
    lengths = np.concatenate([_runs(m) for m in masks])
    assert len(lengths) == 2000 * spans and lengths.mean() == pytest.approx(3.0, abs=0.05) and lengths.min() >= 1
    assert lengths.std() > 1.5 and (lengths == 1).mean() > 0.2  # T5's random segmentation, not fixed spans of 3
    assert masks[:, -1].all() and masks[:, 1:].any(0).all()  # runs alternate, the last one noise; spans anywhere
    c = split_of("span", data_root / "pystdlib", "val", T)
    n = 64
    b = data.span_batch(c, range(n), n)
    assert b["idx"].shape == (n, T) and b["dec_idx"].shape == b["targets"].shape == (n, D) and b["attn_mask"].all()
    last = len(c["data"]) - raw
    for i in range(n):
        x, y = b["idx"][i], b["targets"][i]
        sentinel = lambda a: a[a >= base + data.N_SPECIAL] - base - data.N_SPECIAL
        assert sentinel(x).tolist() == sentinel(y).tolist() == list(range(spans))  # one per span, in increasing order
        assert x[-1] == y[-1] == meta["sep_id"] and b["dec_idx"][i].tolist() == [sp.pad] + y[:-1].tolist()
        start = i * last // (n - 1)  # the fixed validation windows are evenly spaced
        assert data.span_uncorrupt(x, y, base) == c["data"][start:start + raw].tolist()
    again = data.span_batch(c, range(n - 4, n), n)
    assert all(np.array_equal(again[k], b[k][n - 4:]) for k in b)
    train_c = split_of("span", data_root / "pystdlib", "train", T)
    tb = data.span_batch(train_c, range(0, 16), 16, 1, 7)  # a pure function of (seed, step, row)
    part = data.span_batch(train_c, range(12, 16), 16, 1, 7)
    assert all(np.array_equal(part[k], tb[k][12:]) for k in tb)
    assert not np.array_equal(data.span_batch(train_c, range(12, 16), 16, 1, 8)["idx"], part["idx"])


def test_span_lengths_are_t5s():
    assert data.span_lengths(512) == (568, 114)  # T5's inputs_length=512: 568 raw tokens, targets of 114
    for T in [*range(10, 200), *range(200, 1810, 37), 1809]:
        raw, D = data.span_lengths(T)
        x = np.arange(raw) % 1000  # (ids below the base vocabulary, 1000)
        inputs, targets = data.span_corrupt(x, data.noise_mask(raw, np.random.default_rng(T)), 1000, -5)
        assert (len(inputs), len(targets)) == (T, D), T
        assert data.span_uncorrupt(inputs, targets, 1000) == x.tolist()
        longer = data.span_corrupt(np.zeros(raw + 1, np.int64), data.noise_mask(raw + 1, np.random.default_rng(0)),
                                   1000, -5)
        assert len(longer[0]) == T + 1  # the longest window that fits
    with pytest.raises(ValueError, match="seq_len=9 is too short"):
        data.span_lengths(9)
    with pytest.raises(ValueError, match="more than the 100 sentinels"):
        data.span_lengths(1810)


def test_seq2seq_prepare_roundtrip_and_batches(tmp_path):
    pairs = [(f"source {i}: " + "ü" * (i % 5), f"target {i}" + "!" * (i % 3)) for i in range(45)]
    pairs[20] = ("a long source, longer than seq_len", "a long target, cut too")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--seq2seq", "--name=p",
                        f"--input={tmp_path / 'p.jsonl'}", f"--out_dir={tmp_path}", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = data.load_meta(tmp_path / "p")
    assert meta["seq2seq"] is True and (meta["train_docs"], meta["val_docs"]) == (84, 6)  # two documents per example
    tok, sp, eos = prepare.get_tokenizer_from_meta(meta), data.special_ids(meta["vocab_size"]), meta["sep_id"]
    T, D = 24, 12
    c = split_of("seq2seq", tmp_path / "p", "val", T, dec_len=D)
    assert [tuple(tok.decode(a.tolist()) for a in data.seq2seq_example(c, k)) for k in range(3)] == [
        pairs[0], pairs[20], pairs[40]]
    train_c = split_of("seq2seq", tmp_path / "p", "train", T)
    assert train_c["D"] == T and tok.decode(data.seq2seq_example(train_c, 41)[1].tolist()) == pairs[44][1]
    b = data.seq2seq_batch(c, range(4), 4)  # row 3: past the last example, example 0 again
    for row, (src, tgt) in enumerate([pairs[0], pairs[20], pairs[40], pairs[0]]):
        s, t = tok.encode(src)[:T - 1] + [eos], tok.encode(tgt)[:D - 1] + [eos]  # a long one is cut, its EOS kept
        assert b["idx"][row].tolist() == s + [sp.pad] * (T - len(s))
        assert b["attn_mask"][row].tolist() == [True] * len(s) + [False] * (T - len(s))
        assert b["targets"][row].tolist() == t + [-1] * (D - len(t))
        assert b["dec_idx"][row].tolist() == [sp.pad] + t[:-1] + [sp.pad] * (D - len(t))
    tb = data.seq2seq_batch(train_c, range(8), 8, 0, 3)
    assert all(np.array_equal(tb[k][4:], data.seq2seq_batch(train_c, range(4, 8), 8, 0, 3)[k]) for k in tb)
    with pytest.raises(ValueError, match="not a seq2seq corpus"):
        data.pairs_corpus(tmp_path / "p", "val", {k: v for k, v in meta.items() if k != "seq2seq"})


def test_seq2seq_bad_jsonl_named_by_line(tmp_path):
    good = json.dumps({"source": "a", "target": "b"})
    for name, text, match in [("missing", f'{good}\n{{"source": "a"}}\n',
                               "missing.jsonl:2: expected a JSON object with 'source' and 'target'"),
                              ("number", f'{good}\n\n{{"source": "a", "target": 3}}\n', "number.jsonl:3: expected"),
                              ("notjson", f"{good}\nsource, target\n", "notjson.jsonl:2: not a line of JSON")]:
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(ValueError, match=match):
            prepare.prepare_seq2seq(name, [str(tmp_path / f"{name}.jsonl")], out_dir=tmp_path, quiet=True)
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--seq2seq", "--name=x",
                        f"--input={tmp_path / 'notjson.jsonl'}", f"--out_dir={tmp_path}"],
                       capture_output=True, text=True)
    assert (r.returncode != 0 and r.stderr.count("\n") == 1 and "notjson.jsonl:2" in r.stderr
            and "Traceback" not in r.stderr)


def _pairs(folder, split):
    meta = data.load_meta(folder)
    tok, c = prepare.get_tokenizer_from_meta(meta), data.pairs_corpus(folder, split, meta)
    return [tuple(tok.decode(a.tolist()) for a in data.seq2seq_example(c, k)) for k in range(len(c["ends"]) // 2)]


@pytest.mark.slow
def test_stdlib_params_demo_task(t5_demo, monkeypatch):
    import ast
    ex = {s: _pairs(t5_demo, s) for s in ("train", "val")}
    assert len(ex["train"]) > 4000 and len(ex["val"]) > 150
    for src, tgt in ex["train"] + ex["val"]:
        a = ast.parse(src + " pass").body[0].args  # the source is a whole header
        names = [p.arg for p in a.posonlyargs + a.args] + ([f"*{a.vararg.arg}"] if a.vararg else []) + \
                [p.arg for p in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
        assert tgt == " ".join(names) and len(names) >= 2 and len(src.encode()) <= 63, (src, tgt)
        assert tgt not in src  # not copyable: no part of the source is the answer
    assert len({s for s, _ in ex["train"] + ex["val"]}) == len(ex["train"]) + len(ex["val"])  # each header once
    import collections
    common = collections.Counter(t for _, t in ex["train"]).most_common(1)[0][0]
    # the most common training target: a poor guess
    assert sum(t == common for _, t in ex["val"]) / len(ex["val"]) < 0.05
    files = prepare.pystdlib_files()
    val_text = "".join(Path(f).read_text(errors="replace") for i, (_, f) in enumerate(files) if i % 20 == 0)
    assert all(s in val_text for s, _ in ex["val"] if "\n" not in s)  # split by file like pystdlib
    monkeypatch.setattr(prepare, "pystdlib_files", lambda: files[:100])  # deterministic: the first 100 files give
    part = prepare.stdlib_param_examples()                                # the first examples of the whole task
    for split in ("train", "val"):
        mine = [(s, t) for s, t, sp in part if sp == split]
        assert mine == ex[split][:len(mine)] and mine


def test_exact_match_and_copy_baselines(t5_demo):
    """sample.evaluate_exact_match with a stand-in model that answers right on even examples and copies the
    source's first line on odd ones: the measured accuracy is the share of even examples."""
    import sample
    from types import SimpleNamespace
    meta = data.load_meta(t5_demo)
    tok, sp, eos = prepare.get_tokenizer_from_meta(meta), data.special_ids(meta["vocab_size"]), meta["sep_id"]
    val = _pairs(t5_demo, "val")
    answer = {s: t if k % 2 == 0 else s.split("\n")[0] for k, (s, t) in enumerate(val)}
    calls = []

    def generate(x, max_new_tokens, attn_mask, start_id, stop_id, temperature, **kw):
        calls.append((x.shape, max_new_tokens, start_id, stop_id, temperature))
        assert torch.equal(attn_mask, x != sp.pad)
        out = [tok.encode(answer[tok.decode(row[m][:-1].tolist())]) + [eos] for row, m in zip(x, attn_mask)]
        return torch.tensor([o + [eos] * (max_new_tokens - len(o)) for o in out])  # a finished row repeats EOS
    net = SimpleNamespace(cfg=SimpleNamespace(n_dec_layer=2, block_size=512),
                          tok_emb=SimpleNamespace(weight=torch.zeros(1)), generate=generate)
    ckpt = dict(config=dict(data_root=str(t5_demo.parent), dataset=t5_demo.name, seq_len=64, dec_len=0), meta=meta)
    r = sample.evaluate_exact_match(net, ckpt, "val", batch_size=50)
    assert r["n"] == len(val) and r["exact_match"] == (len(val) + 1) // 2 / len(val) and r["too_long"] == 0
    assert r["baselines"]["source"] == r["baselines"]["first line"] == 0.0
    assert ([k for k in r["baselines"]][2].startswith("most common training target")
            and list(r["baselines"].values())[2] < 0.05)
    assert len(calls) == -(-len(val) // 50) and calls[0][1:] == (64, sp.pad, eos, 0.0)


def test_a_one_file_corpus_is_split_inside_and_trains(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(600))  # ~17 KB, one document
    (tmp_path / "input.txt").write_text(text)
    folder = Path(prepare.prepare("shake", [str(tmp_path / "input.txt")], out_dir=tmp_path, quiet=True))
    meta = data.load_meta(folder)
    assert meta["split_inside"] and meta["train_docs"] == meta["val_docs"] == 1
    assert 0.04 < meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"]) < 0.06  # the last 5%
    assert np.fromfile(folder / "train.bin", np.uint16)[-2] == 10  # cut at a line boundary: train ends a line
    s = train.train(tiny_cfg(tmp_path, tmp_path / "out", dataset="shake", max_iters=3, eval_interval=3, warmup_iters=1))
    assert s["step"] == 3 and np.isfinite(s["train_losses"]).all()
    with pytest.raises(common.UserError, match="split inside its few documents"):
        prepare.prepare("shake", [str(tmp_path / "input.txt")], out_dir=tmp_path, quiet=True, append=True)


# ------------------------------------------------------------------------------------------------
# the summarisation demo task (stdlib_docstrings) and its metric (ROUGE, by Google's rouge-score)

@pytest.mark.slow
def test_stdlib_docstrings_demo_task(t5_doc_demo, monkeypatch, tmp_path):
    import ast
    flat = lambda s: " ".join(s.lower().split())
    ex = {s: _pairs(t5_doc_demo, s) for s in ("train", "val")}
    assert len(ex["train"]) > 3000 and len(ex["val"]) > 100
    for src, tgt in ex["train"] + ex["val"]:
        assert flat(tgt) not in flat(src), (src, tgt)  # no target inside its source, case and spacing ignored
        assert len(src.encode()) <= 511 and 8 <= len(tgt.encode()) <= 95 and len(tgt.split()) >= 2
        f = next(n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        assert ast.get_docstring(f) is None and f.body, src  # a whole function, its docstring removed
        assert tgt == prepare.first_sentence(tgt) and "\n" not in tgt  # one sentence, on one line
    assert len({s for s, _ in ex["train"] + ex["val"]}) == len(ex["train"]) + len(ex["val"])  # each source once
    files = prepare.pystdlib_files()
    val_text = "".join(Path(f).read_text(errors="replace") for i, (_, f) in enumerate(files) if i % 20 == 0)
    assert all(s.split("\n")[0].strip() in val_text for s, _ in ex["val"])  # split by file like pystdlib
    monkeypatch.setattr(prepare, "pystdlib_files", lambda: files[:100])  # deterministic: the first 100 files give
    part = prepare.stdlib_docstring_examples()                            # the first examples of the whole task
    for split in ("train", "val"):
        mine = [(s, t) for s, t, sp in part if sp == split]
        assert mine == ex[split][:len(mine)] and mine
    # on a hand-made file (file 0: validation): what is kept, and how
    (tmp_path / "m.py").write_text('''
@cache
def keep(a, b):
    """Add two
    numbers.

    More text."""

    return a + b

def copied(x):
    """Return x."""
    return x  # return x.

def only_doc():
    """Nothing else here."""

def same_line(): """On the header's line."""; return 1

def short(y):
    """Short."""
    return y
''')
    monkeypatch.setattr(prepare, "pystdlib_files", lambda: [("m.py", str(tmp_path / "m.py"))])
    assert prepare.stdlib_docstring_examples() == [("@cache\ndef keep(a, b):\n    return a + b", "Add two numbers.",
                                                    "val")]
    assert prepare.first_sentence("Return  the\n  thing! More.") == "Return the thing!"


def test_rouge_scores_against_the_package(monkeypatch):
    import sample
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    preds = ["the cat on the mat", "Returns the values.", "", "def f(x)", "Return the value."]
    refs = ["the cat sat on the mat", "Return the value.", "Return the value.", "Return x.", "Return the value."]
    r = sample.rouge_scores(preds, refs)
    # by hand, pair 1: 5 of 5 predicted words in the 6 of the reference (F 10/11), 3 of 4 bigrams in 5 (F 2/3),
    # LCS 5; pair 2 the same words once stemmed (returns -> return, values -> valu); pair 3 nothing; pair 4 "x"
    # (F 2/5); pair 5 exact
    assert r["rouge1"] == pytest.approx(100 * (10 / 11 + 1 + 0 + 2 / 5 + 1) / 5)
    assert r["rouge2"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 0 + 1) / 5)
    assert r["rougeL"] == pytest.approx(100 * (10 / 11 + 1 + 0 + 2 / 5 + 1) / 5) and r["exact_match"] == 20.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)  # the package itself
    for k in ("rouge1", "rouge2", "rougeL"):
        assert r[k] == pytest.approx(100 * np.mean([scorer.score(t, p)[k].fmeasure for p, t in zip(preds, refs)]))
    assert sample.name_words("def get_systemId(self):") == "get system id"  # a baseline
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)  # not installed: one line naming pip
    with pytest.raises(ValueError, match="ROUGE needs the optional package rouge-score: pip install rouge-score"):
        sample.rouge_scores(["a"], ["a"])
    with pytest.raises(ValueError, match="eval_rouge needs the optional package rouge-score: pip install rouge"):
        train.check_config(train.get_config([str(REPO / "config/t5_docstrings.py"), "--init_from=scratch"]))


def test_label_fraction_picks_seq2seq_pairs(t5_demo):
    """label_fraction takes a seeded share of the seq2seq pairs (label_subset, as for classify); at 1.0 the rows
    are those drawn before the subset existed (an example drawn from all n)."""
    obj = data.OBJECTIVES["seq2seq"]
    tr = split_of("seq2seq", t5_demo, "train", 64, label_fraction=0.1, seed=7)
    n = len(tr["ends"]) // 2
    pick = data.label_subset(n, 0.1, 7)
    assert np.array_equal(tr["subset"], pick) and len(pick) == -(-n // 10)
    rows = obj.batch(tr, range(64), 64, seed=7, step=3)
    allowed = {data.seq2seq_row(tr, int(k))["idx"].tobytes() for k in pick}
    assert {r.tobytes() for r in rows["idx"]} <= allowed and len({r.tobytes() for r in rows["idx"]}) > 1
    full = split_of("seq2seq", t5_demo, "train", 64, seed=7)
    drawn = [data.seq2seq_row(full, int(np.random.default_rng((7, 3, i)).integers(n))) for i in range(16)]
    for k in ("idx", "dec_idx", "targets"):
        assert np.array_equal(obj.batch(full, range(16), 16, 7, 3)[k], np.stack([r[k] for r in drawn]))


def test_span_whole_targets(data_root):
    """span_targets='whole': the same corrupted input, and the decoder writes the whole window (what
    span_uncorrupt rebuilds from T5's targets) and EOS."""
    obj, meta = data.OBJECTIVES["span"], data.load_meta(data_root / "pystdlib")
    spans = split_of("span", data_root / "pystdlib", "val", 64)
    whole = split_of("span", data_root / "pystdlib", "val", 64, span_targets="whole")
    assert whole["raw"] == spans["raw"] and whole["D"] == whole["raw"] + 1 and spans["D"] < whole["D"]
    a, b = obj.batch(spans, range(8), 8), obj.batch(whole, range(8), 8)
    assert np.array_equal(a["idx"], b["idx"]) and np.array_equal(a["attn_mask"], b["attn_mask"])
    pad, eos = data.special_ids(meta["vocab_size"]).pad, meta["sep_id"]
    for i in range(8):
        window = data.span_uncorrupt(a["idx"][i], a["targets"][i][a["targets"][i] != -1], meta["vocab_size"])
        assert b["targets"][i].tolist() == window + [eos] and b["dec_idx"][i].tolist() == [pad] + window
    with pytest.raises(ValueError, match="dec_len=20 is shorter than the 71 target tokens"):
        split_of("span", data_root / "pystdlib", "val", 64, span_targets="whole", dec_len=20)
