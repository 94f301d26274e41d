"""
Fixtures and helpers shared by the test files under tests/: the prepared corpus, a private cache folder, tiktoken's
gpt2 encoding, the seq2seq demo task; small train.py configs (tiny_cfg, BERT_CFG, t5_cfg); the 2-rank torchrun
launcher; main_fails for one-line CLI errors; the Hugging Face helpers.
pytest finds the fixtures here by itself; the helpers are imported: from conftest import tiny_cfg.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import hf
import model as M
import prepare
import train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
TIKTOKEN_CACHE = REPO.parent / "shared" / "tiktoken-cache"  # the repo's ../shared, with gpt2 in it


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The built-in corpus, prepared once for the whole session."""
    root = tmp_path_factory.mktemp("data")
    prepare.prepare(out_dir=root, quiet=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """The measured CPU peak is cached under XDG_CACHE_HOME: the tests (and their torchrun ranks) use their own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def gpt2(monkeypatch):
    """tiktoken's gpt2 encoding, from ../shared/tiktoken-cache when present; skipped when it cannot be had."""
    pytest.importorskip("tiktoken")
    if TIKTOKEN_CACHE.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    try:
        tok = prepare.get_tokenizer("gpt2")
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"gpt2 encoding not available offline: {e}")
    return tok


@pytest.fixture(scope="session")
def t5_demo(tmp_path_factory):
    """The built-in seq2seq demo task, prepared once (~8 s: every stdlib file is parsed)."""
    return Path(prepare.prepare(prepare.SEQ2SEQ_DEMO, out_dir=tmp_path_factory.mktemp("t5demo"), quiet=True))


@pytest.fixture(scope="session")
def t5_doc_demo(t5_demo):
    """The built-in summarisation task, prepared once beside the parameter task (~6 s: the stdlib is parsed)."""
    return Path(prepare.prepare("stdlib_docstrings", out_dir=t5_demo.parent, quiet=True))


# ------------------------------------------------------------------------------------------------
# train.py configs for quick CPU runs

def tiny_cfg(data_root, out_dir, **kw):
    """A train.py config for a quick CPU run on pystdlib."""
    cfg = dict(train.DEFAULTS)
    cfg.update(data_root=str(data_root), out_dir=str(out_dir), n_layer=2, n_embd=64, n_head=4, block_size=64,
               batch_size=8, max_iters=20, eval_interval=10, eval_iters=2, log_interval=100, warmup_iters=5,
               learning_rate=3e-3, threads=1, device="cpu",
               optimizer="adamw", lr_schedule="cosine", min_lr=3e-4)  # what the tests were written for (old defaults)
    cfg.update(kw)
    return cfg


BERT_CFG = dict(objective="mlm_nsp", model="bert-tiny", n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=32,
                learning_rate=3e-3, min_lr=3e-4, warmup_iters=20, eval_iters=8)


T5_CFG = dict(objective="span", model="t5-tiny", n_layer=2, n_embd=64, n_head=4, block_size=None, seq_len=64)


def t5_cfg(data_root, out, demo=None, **kw):
    """tiny_cfg for the small T5 above; with demo (the t5_demo folder), seq2seq on the demo task."""
    where = dict(objective="seq2seq", data_root=str(demo.parent), dataset=demo.name) if demo else {}
    return {**tiny_cfg(data_root, out, **{**T5_CFG, **kw}), **where}


# ------------------------------------------------------------------------------------------------
# launching 2 ranks with torchrun (their worker: tests/test_distributed.py's __main__)

def launch_ranks(*args, timeout=600):
    """tests/test_distributed.py under torchrun with 2 ranks of one thread: its __main__ runs the worker that
    args[0] names, with the other args. Returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")  # a crash: its stack
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "test_distributed.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def run_ranks(*args):
    """launch_ranks(*args), which must succeed."""
    r = launch_ranks(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def torchrun(phase, data_root, out):
    """Phase `phase` of test_distributed.dist_worker on 2 ranks: the results its rank 0 saved."""
    run_ranks("dist", phase, data_root, out)
    return torch.load(Path(out) / f"phase{phase}.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------
# one-line CLI errors

def main_fails(argv, data_root, tmp_path, monkeypatch, capsys):
    """train.main with valid settings, then argv: (exit status, stderr) after checking that no training step
    ran and nothing was written to the run's folder."""
    out = tmp_path / "run"
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1) / 0)
    base = [f"--data_root={data_root}", f"--out_dir={out}", "--device=cpu", "--threads=1", "--n_layer=1", "--n_embd=32",
            "--block_size=32", "--max_iters=2", "--warmup_iters=0", "--eval_iters=1"]
    status = train.main(base + argv)
    err = capsys.readouterr().err
    assert not steps and not out.exists(), argv
    return status, err


# ------------------------------------------------------------------------------------------------
# Hugging Face (tests/test_hf.py, and an import under FSDP in tests/test_distributed.py)

def hf_libs():
    pytest.importorskip("safetensors", reason="safetensors is optional: pip install safetensors")
    return pytest.importorskip("transformers", reason="transformers is optional: pip install transformers")


def perturb(net, scale=0.1):
    """Large random offsets on every weight, so that every norm, bias and permutation shows in the logits."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


def logit_gap(ours, theirs, x):
    """max |ours - theirs| over the logits (BERT: MLM and NSP) of the same input ids. T5: x is the source,
    row 1 padded from position 17 on, and reversed the decoder's input."""
    with torch.no_grad():
        if ours.cfg.n_dec_layer:
            mask = torch.ones_like(x, dtype=torch.bool)
            mask[1, 17:] = False
            a = ours(x, attn_mask=mask, dec_idx=x.flip(1))[0]
            b = theirs(input_ids=x, attention_mask=mask.long(), decoder_input_ids=x.flip(1))
        else:
            a, b = ours(x)[0], theirs(input_ids=x)
    a = a if isinstance(a, tuple) else (a,)
    b = (b.prediction_logits, b.seq_relationship_logits) if hasattr(b, "prediction_logits") else (b.logits,)
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def from_hf(folder):
    ck = hf.load_checkpoint(str(folder))
    with torch.device("meta"):
        m = M.from_config(M.ModelConfig(**ck["model_args"]))
    m.to_empty(device="cpu")
    m.init_buffers()
    checkpoint.restore(ck, m)  # checks every name and shape
    return m.eval(), ck


def _hf_tokenizer_file(folder, eos="</s>"):
    """A small byte-level BPE tokenizer.json trained here, with a tokenizer_config.json naming its eos_token."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is optional: pip install tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"def f_{i}(self, x):\n    return self.x + {i}\n" for i in range(200)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos}}))
    return tok, folder / "tokenizer.json"


def split_of(objective, data_dir, split, T, **cfg):
    """An objective's split, opened and fitted as train.py does (cfg: dec_len, label_fraction, seed)."""
    obj, meta = data.OBJECTIVES[objective], data.load_meta(data_dir)
    return obj.fit(obj.open(data_dir, split, meta), T, {"dec_len": 0, "label_fraction": 1.0, "seed": 0, **cfg})
