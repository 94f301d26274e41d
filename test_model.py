"""
anvil's tests: model, training, data. Run: python -m pytest -q test_model.py
Each test process uses one thread (torch.set_num_threads(1)) so that tests never fight over cores,
and distributed tests launch torchrun with 2 ranks of one thread each.
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import checkpoint
import common
import data
import hf
import logger
import model as M
from parallelize import blocks_of
import prepare
import train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent
TIKTOKEN_CACHE = REPO.parent / "shared" / "tiktoken-cache"  # the repo's ../shared, with gpt2 in it

# a small GPT-2 style and a small LLaMA style (GQA) config, for quick checks of both paths; and a decoder-only
# model with T5's relative position bias, whose causal mask is in the bias
SMALL = {
    "gpt2": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32),
    "llama": dict(M.PRESETS["llama-50m"], vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                  n_embd=32, multiple_of=16),
    "relative": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="relative", norm="rmsnorm",
                     mlp="relu", bias=False, relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


CPU = train.Runtime(torch.device("cpu"), torch.float32)  # one process, fp32, no compile


def small_model(style, seed=0, **kw):
    torch.manual_seed(seed)
    return M.Transformer(M.ModelConfig(**{**SMALL[style], **kw})).eval()


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


def tiny_cfg(data_root, out_dir, **kw):
    """A train.py config for a quick CPU run on pystdlib."""
    cfg = dict(train.DEFAULTS)
    cfg.update(data_root=str(data_root), out_dir=str(out_dir), n_layer=2, n_embd=64, n_head=4, block_size=64,
               batch_size=8, max_iters=20, eval_interval=10, eval_iters=2, log_interval=100, warmup_iters=5,
               learning_rate=3e-3, threads=1, device="cpu",
               optimizer="adamw", lr_schedule="cosine", min_lr=3e-4)  # what the tests were written for (the old defaults)
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------------------------------------
# model

@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_shapes(style):
    m = small_model(style)
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():  # while autograd records (training) the fused loss returns no logits
        logits, loss = m(x, x)
    assert logits.shape == (3, 20, 97) and loss.shape == ()
    logits, loss = m(x)
    assert logits.shape == (3, 20, 97) and loss is None
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("style", ["gpt2", "llama", "relative"])
def test_causality(style):
    m = small_model(style)
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 15:] = (y[:, 15:] + 1) % 97  # change every token from position 15 on
    a, b = m(x)[0], m(y)[0]
    assert torch.equal(a[:, :15], b[:, :15])  # earlier positions never see the future
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("name,count", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200), ("llama-7b", 6_738_415_616),
    ("llama-1b", 1_100_048_384),  # TinyLlama-1.1B's published count
])
def test_param_counts(name, count):
    with torch.device("meta"):
        m = M.Transformer(M.config_from_preset(name))
    assert m.num_params() == count


def test_all_presets_build_on_meta():
    for name in M.PRESETS:
        with torch.device("meta"):
            m = M.Transformer(M.config_from_preset(name))
        assert m.num_params() > 0 and all(p.is_meta for p in m.parameters())


def test_swiglu_hidden_follows_llama_rule():
    assert M.config_from_preset("llama-7b").ffn_hidden == 11008
    assert M.config_from_preset("gpt2").ffn_hidden == 3072


def test_norms_and_attention_match_pytorch_reference():
    # our attention with one KV head per query head equals nn.MultiheadAttention with the same weights
    cfg = M.ModelConfig(**SMALL["gpt2"])
    att = M.Attention(cfg)
    torch.nn.init.normal_(att.q.bias), torch.nn.init.normal_(att.kv.bias)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([att.q.weight, att.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([att.q.bias, att.kv.bias]))
        ref.out_proj.weight.copy_(att.proj.weight), ref.out_proj.bias.copy_(att.proj.bias)
    x = torch.randn(2, 10, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    expect = ref(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(att(x), expect, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    # GQA with 2 KV heads == MHA whose K/V weights repeat each KV head for its 2 query heads
    g = M.Attention(M.ModelConfig(**{**SMALL["llama"], "n_kv_head": 2}))
    m = M.Attention(M.ModelConfig(**{**SMALL["llama"], "n_kv_head": 4}))
    with torch.no_grad():
        m.q.weight.copy_(g.q.weight), m.proj.weight.copy_(g.proj.weight)
        k, v = g.kv.weight.view(2, 2, 8, 32)  # (k|v, Hkv, D, C)
        m.kv.weight.copy_(torch.cat([k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)]).view(64, 32))
    x = torch.randn(2, 10, 32)
    rope = M.rope_cache(g.cfg)
    torch.testing.assert_close(g(x, rope), m(x, rope), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama", "relative"])
def test_kv_cache_greedy_equals_full_recompute(style):
    m = small_model(style)
    prompt = torch.randint(0, 97, (2, 5))
    a = m.generate(prompt, 25, temperature=0, use_cache=True)
    b = m.generate(prompt, 25, temperature=0, use_cache=False)
    assert a.shape == (2, 30) and torch.equal(a, b)
    # the cached logits themselves match the full forward pass
    cache = m.new_cache(2, "cpu", torch.float32)
    full = m(a[:, :20])[0]
    m(a[:, :12], cache=cache, pos=0)
    step = m(a[:, 12:20], cache=cache, pos=12)[0]  # a multi-token chunk after a prefix
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert M.sample_next(logits, 0).item() == 1
    assert all(M.sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    draws = {M.sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {M.sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}  # 1 alone has p~0.49 < 0.5, so the nucleus needs 3 too
    assert {M.sample_next(logits, 1.0, top_p=0.4, generator=g).item() for _ in range(50)} == {1}


def test_config_validation_messages():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        M.ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_head=6 is not divisible by n_kv_head=4"):
        M.ModelConfig(n_embd=48, n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="unknown model preset 'gtp2'"):
        M.config_from_preset("gtp2")


def test_init_is_per_parameter_and_scaled():
    a, b = small_model("llama", seed=1), small_model("llama", seed=2)  # global RNG does not matter
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    m = M.Transformer(M.ModelConfig(**{**SMALL["gpt2"], "n_layer": 8}))
    std_proj = m.blocks[0].attn.proj.weight.std().item()
    assert abs(std_proj - 0.02 / 4) < 0.002 and abs(m.blocks[0].attn.q.weight.std().item() - 0.02) < 0.003
    m.init_weights(seed=1)
    assert not torch.equal(m.blocks[0].attn.q.weight, a.blocks[0].attn.q.weight[:m.blocks[0].attn.q.weight.shape[0]])


def test_flops_per_token_gpt2_matches_6n_rule():
    cfg = M.config_from_preset("gpt2")
    with torch.device("meta"):
        n = M.Transformer(cfg).num_params(non_embedding=True)
    # 6 * (non-embedding params + tied head) + 12 * L * C * T: the PaLM / nanoGPT estimate, minus
    # the norms and biases, which do no matmul
    approx = 6 * (n + cfg.vocab_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert abs(M.flops_per_token(cfg) - approx) / approx < 1e-3


# ------------------------------------------------------------------------------------------------
# configuration

def test_config_overrides_and_files(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 4\nlearning_rate = 1e-3  # a comment\nmodel = 'gpt2'\n")
    cfg = train.get_config([str(f), "--batch_size=8", "--dataset=shakespeare", "--compile=True", "--min_lr=0"])
    assert (cfg["batch_size"], cfg["learning_rate"], cfg["model"]) == (8, 1e-3, "gpt2")
    assert cfg["dataset"] == "shakespeare" and cfg["compile"] is True and cfg["min_lr"] == 0.0
    assert cfg["max_iters"] == train.DEFAULTS["max_iters"]


@pytest.mark.parametrize("argv,match", [
    (["--batch_sise=8"], "unknown config key 'batch_sise'; did you mean 'batch_size'"),
    (["--learnig_rate=1e-3"], "did you mean 'learning_rate'"),
    (["--batch_size=8.5"], "batch_size=8.5 is not allowed: batch_size must be int >= 1"),
    (["--batch_size=big"], "batch_size='big' is not allowed"),
    (["--compile=1"], "compile must be bool or None"),
    (["--n_layer=two"], "n_layer must be int >= 1 or None"),
    (["--max_iters"], "must look like --key=value"),
    (["nope.py"], "config file 'nope.py' not found"),
])
def test_config_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        train.get_config(argv)


def test_every_config_file_is_valid():
    for path in sorted((REPO / "config").glob("*.py")):
        cfg = train.get_config([str(path)])  # unknown keys or wrong types would raise
        if cfg["init_from"] in ("scratch", "resume"):
            mcfg = M.config_from_preset(cfg["model"], **{k: cfg[k] for k in train.MODEL_KEYS if cfg.get(k) is not None})
            assert mcfg.block_size >= (cfg["block_size"] or 0), path.name


def test_config_file_unknown_key(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nn_layers = 4\n")
    with pytest.raises(ValueError, match="'n_layers'; did you mean 'n_layer'"):
        train.get_config([str(f)])


def test_cli_config_error_is_one_line_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--eval_intreval=5"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode != 0 and "did you mean 'eval_interval'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# training

def test_loss_falls_on_pystdlib(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path, max_iters=150, eval_interval=75, batch_size=16, learning_rate=1e-2))
    (s0, v0), (_, v_mid), (_, v_end) = s["evals"]
    assert s0 == 0 and v0 > 5.0  # ln(257) = 5.55: untrained
    assert v_end < v_mid < 3.0 and v_end < 2.8, s["evals"]  # below a unigram byte model (~3.0)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {"step", "loss", "lr", "tok_s", "mfu", "ms_step", "eta_s"} <= set(log[-1]) | set(log[-2])


def test_exact_resume(data_root, tmp_path):
    common = dict(max_iters=12, eval_interval=6, lr_decay_iters=12, dropout=0.1, gradient_accumulation_steps=2)
    full = train.train(tiny_cfg(data_root, tmp_path / "a", **common))
    half = train.train(tiny_cfg(data_root, tmp_path / "b", **{**common, "max_iters": 6}))
    rest = train.train(tiny_cfg(data_root, tmp_path / "b", **common, init_from="resume"))
    assert half["train_losses"] + rest["train_losses"] == full["train_losses"]  # bit for bit
    a, b = full["model"].state_dict(), rest["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path / "a"))
    cb = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path / "b"))
    assert ca["step"] == cb["step"] == 12
    for name, st in ca["optimizer"]["state"].items():  # keyed by parameter name
        assert all(torch.equal(st[k], cb["optimizer"]["state"][name][k]) for k in st), name


def ns_reference(G, steps=5):
    """Newton-Schulz's quintic iteration toward U V^T of G = U S V^T (Keller Jordan's coefficients), in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double().T if G.size(0) > G.size(1) else G.double()
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.size(0) > G.size(1) else X


def test_optimizer_auto_is_muon_but_adamw_under_fsdp_or_old_torch(monkeypatch):
    """optimizer='auto' (the default): Muon, but AdamW where Muon cannot run (FSDP shards, torch before 2.9)."""
    of = lambda **kw: train.optimizer_of(dict(train.DEFAULTS, **kw))
    assert train.DEFAULTS["optimizer"] == "auto"
    assert (of(), of(parallel="ddp"), of(parallel="fsdp"), of(optimizer="adamw")) == ("muon", "muon", "adamw", "adamw")
    monkeypatch.delattr(torch.optim, "Muon")
    assert (of(), of(optimizer="muon")) == ("adamw", "muon")  # an explicit muon still gets check_config's one line


def test_head_lr_mult_gives_a_classifiers_new_head_its_own_learning_rate():
    """head_lr_mult: a classifier's pooler and classifier in one AdamW group at lr * head_lr_mult, every other
    parameter at lr; an MLM+NSP model (whose heads are pretrained) has no such group."""
    cfg = dict(train.DEFAULTS, optimizer="adamw", head_lr_mult=30.0, weight_decay=0.1)
    net = bert_small(head="classify", n_labels=5)
    [adamw] = train.make_optimizer(cfg, net)
    train.set_lr([adamw], cfg, 1e-4)
    head = {id(p) for m in (net.pooler, net.cls_head) for p in m.parameters()}
    by_lr = {}
    for g in adamw.param_groups:
        by_lr.setdefault(round(g["lr"], 12), set()).update(id(p) for p in g["params"])
    assert by_lr == {3e-3: head, 1e-4: {id(p) for p in net.parameters()} - head}
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(net.parameters()))  # each exactly once
    [pretrain] = train.make_optimizer(cfg, bert_small())
    train.set_lr([pretrain], cfg, 1e-4)
    assert {g["lr"] for g in pretrain.param_groups} == {1e-4}


def test_muon_groups_and_update_match_newton_schulz(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, optimizer="muon", muon_lr=0.02, weight_decay=0.1)
    for net in (small_model("gpt2"), small_model("llama"), t5_small()):
        adamw, muon = train.make_optimizer(cfg, net)
        ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in net.parameters())  # every parameter in exactly one group
        inner = {id(p) for b in blocks_of(net) for p in b.parameters() if p.dim() == 2}
        assert {id(p) for p in muon.param_groups[0]["params"]} == inner  # the blocks' matrices, decoder's too
        assert id(net.tok_emb.weight) in {id(p) for p in adamw.param_groups[0]["params"]}  # embeddings (and head): AdamW
    train.set_lr([adamw, muon], cfg, 1.5e-3)  # half of learning_rate: Muon's lr is halved too
    assert adamw.param_groups[0]["lr"] == 1.5e-3 and muon.param_groups[0]["lr"] == 0.01
    w = net.dec_blocks[0].mlp.up  # (ffn_hidden, C): taller than wide
    before, g = w.weight.detach().clone(), torch.randn_like(w.weight)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    w.weight.grad = g.clone()
    muon.step()
    update = (before * (1 - 0.01 * 0.1) - w.weight.detach()) / (0.01 * (g.size(0) / g.size(1)) ** 0.5)
    ref = ns_reference(g).float()  # Muon's first step: Nesterov momentum is a multiple of g, which NS ignores
    assert (update - ref).norm() / ref.norm() < 0.02  # torch runs the iteration in bf16
    s = torch.linalg.svdvals(update)
    assert 0.5 < s.min() and s.max() < 1.5  # orthogonalised: singular values near 1, whatever g's were


def test_wsd_schedule_and_extending_a_resumed_run(data_root, tmp_path):
    cfg = dict(train.DEFAULTS, lr_schedule="wsd", learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=100, decay_frac=0.2)
    lr = [train.get_lr(cfg, i) for i in range(101)]
    assert lr[:10] == [(i + 1) / 10 for i in range(10)] and set(lr[10:80]) == {1.0}  # warmup, then stable
    assert lr[80:] == [(100 - i) / 20 for i in range(80, 100)] + [0.0]  # linear to zero over the last 20%
    longer = [train.get_lr({**cfg, "max_iters": 200}, i) for i in range(201)]
    assert longer[:160] == lr[:10] + [1.0] * 150 and longer[180] == 0.5  # raising max_iters moves the decay
    # Muon + WSD: resume from a stable-phase checkpoint with max_iters raised equals the longer run from the start
    run = dict(optimizer="muon", lr_schedule="wsd", decay_frac=0.25, eval_interval=6, warmup_iters=2)
    full = train.train(tiny_cfg(data_root, tmp_path / "full", **run, max_iters=16))
    short = train.train(tiny_cfg(data_root, tmp_path / "short", **run, max_iters=12))  # decays from step 9
    (tmp_path / "ext").mkdir()
    shutil.copy(tmp_path / "short" / "ckpt-0000006.pt", tmp_path / "ext")
    ext = train.train(tiny_cfg(data_root, tmp_path / "ext", **run, max_iters=16, init_from="resume"))
    assert short["train_losses"][:6] + ext["train_losses"] == full["train_losses"]  # bit for bit
    assert short["train_losses"][6:] != ext["train_losses"][:6]  # (the short run decayed from step 9)
    a, b = full["model"].state_dict(), ext["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(tmp_path / d / "ckpt-0000016.pt", weights_only=True)["optimizer"]["state"] for d in ("full", "ext"))
    assert "momentum_buffer" in ca["blocks.0.attn.q.weight"] and "exp_avg" in ca["tok_emb.weight"]  # both optimizers' state
    assert all(torch.equal(v, cb[name][k]) for name, st in ca.items() for k, v in st.items())
    with pytest.raises(common.UserError, match="trained with optimizer='muon'"):
        train.train(tiny_cfg(data_root, tmp_path / "ext", **{**run, "optimizer": "adamw"}, max_iters=20, init_from="resume"))


def test_qk_norm(monkeypatch):
    m = small_model("llama", qk_norm=True)
    seen = []  # the attention's q and k: unit RMS per head and position (before RoPE, which keeps norms)
    monkeypatch.setattr(M, "apply_rope", lambda x, cos, sin: seen.append(x) or x)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        m(x)
    assert len(seen) == 4 and all(torch.allclose(t.pow(2).mean(-1), torch.ones(()), atol=1e-2) for t in seen)  # (eps)
    monkeypatch.undo()
    torch.testing.assert_close(m.generate(x, 8, temperature=0), m.generate(x, 8, temperature=0, use_cache=False))
    with pytest.raises(common.UserError, match="qk_norm=True"):
        hf.arch_of(m.cfg)  # no Hugging Face architecture has it


def test_peak_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(common, "measure_matmul_flops", lambda d, t: calls.append(1) or 1e11)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert common.peak_flops("cpu", torch.float32) == (1e11, "measured fp32 matmul") == common.peak_flops("cpu", torch.float32)
    assert len(calls) == 1 and len(json.load(open(tmp_path / "anvil" / "peak_flops.json"))) == 1  # measured once
    common.peak_flops("cpu", torch.bfloat16)
    assert len(calls) == 2  # another dtype: measured
    (tmp_path / "anvil" / "peak_flops.json").write_text("{not json")
    assert common.peak_flops("cpu", torch.float32)[0] == 1e11 and len(calls) == 3  # corrupt: measured, and rewritten
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "anvil" / "peak_flops.json"))  # a file: cannot be a folder
    assert common.peak_flops("cpu", torch.float32)[0] == 1e11 and len(calls) == 4


def test_checkpoint_contents(data_root, tmp_path):
    train.train(tiny_cfg(data_root, tmp_path, max_iters=10, eval_interval=5, compile=False))
    ck = torch.load(tmp_path / "ckpt-0000010.pt", weights_only=True)  # plain data, no code on load
    assert ck["step"] == 10 and ck["config"]["max_iters"] == 10 and ck["config"]["out_dir"] == str(tmp_path)
    assert ck["meta"]["tokenizer"] == "bytes" and ck["model_args"]["n_layer"] == 2
    assert (tmp_path / "best.pt").exists()
    # compiled in place: the keys are the plain module's (no _orig_mod.)
    cfg = tiny_cfg(data_root, tmp_path, compile=True)
    mcfg = M.ModelConfig(**ck["model_args"])
    compiled = train.build_model(cfg, mcfg, train.Runtime(torch.device("cpu"), torch.float32, compile=True))
    assert list(compiled.state_dict()) == list(ck["model"])
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    # provenance: in the checkpoint and as the first record of log.jsonl, with the resolved config
    prov = ck["provenance"]
    assert (prov["torch"], prov["world"], prov["device_name"].split()[0]) == (torch.__version__, 1, "cpu")
    assert (prov["config"]["device"], prov["config"]["dtype"], prov["config"]["parallel"]) == ("cpu", "float32", "single")
    assert prov["config"]["compile"] is False and prov["config"]["max_iters"] == 10
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert prov["git"] is None if head.returncode else prov["git"].startswith(head.stdout.strip())
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0]) == prov


def test_train_leaves_config_and_signal_handlers_as_found(data_root, tmp_path, monkeypatch):
    import signal
    handlers = lambda: [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    before, cfg = handlers(), tiny_cfg(data_root, tmp_path, max_iters=2, eval_interval=2, warmup_iters=1)
    given = dict(cfg)
    rt = train.setup(cfg)
    assert (rt.device.type, rt.dtype, rt.parallel, rt.compile, rt.world) == ("cpu", torch.float32, "single", False, 1)
    train.train(cfg)
    assert cfg == given and handlers() == before  # 'auto'/None are resolved into the Runtime, not the dict
    monkeypatch.setattr(train, "train_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.train(dict(cfg, out_dir=str(tmp_path / "b")))
    assert handlers() == before  # restored when train() raises, too


def test_find_checkpoint_in_path_or_folder(tmp_path):
    assert checkpoint.find_checkpoint(tmp_path) is None and checkpoint.find_checkpoint(tmp_path / "nope") is None
    for name in ("ckpt-0000002.pt", "ckpt-0000010.pt", "best.pt", "ckpt-0000011.pt.tmp.7"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "ckpt-0000009.dcp").mkdir()
    assert checkpoint.find_checkpoint(tmp_path) == str(tmp_path / "ckpt-0000010.pt")  # newest complete one
    for name in ("best.pt", "ckpt-0000009.dcp"):  # a checkpoint named directly is itself
        assert checkpoint.find_checkpoint(tmp_path / name) == str(tmp_path / name)


def test_atomic_write_and_read_jsonl(tmp_path):
    path = tmp_path / "a.json"
    common.atomic_write(path, "one")
    with pytest.raises(ZeroDivisionError):
        common.atomic_write(path, lambda f: (f.write(b"half"), 1 / 0))
    assert path.read_text() == "one" and os.listdir(tmp_path) == ["a.json"]
    (tmp_path / "l.jsonl").write_text('{"a": 1}\n\n[2]\n{oops\n')
    rows = common.read_jsonl(tmp_path / "l.jsonl")
    assert [next(rows)[:2], next(rows)[:2]] == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(ValueError, match="l.jsonl:4: not a line of JSON"):
        next(rows)


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_file({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_file({"step": 2, "w": torch.zeros(3)}, path)
    assert checkpoint.load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temporary file is left behind


def test_finetune_from_checkpoint_and_early_stopping(data_root, tmp_path):
    train.train(tiny_cfg(data_root, tmp_path / "pre", max_iters=10, eval_interval=5))
    ck = checkpoint.load_checkpoint(tmp_path / "pre" / "best.pt")
    # a fine-tune starts from the weights (val loss at step 0 equals the checkpoint's) with a fresh
    # optimizer at step 0; with lr 0 nothing improves, so patience=2 stops it after two more evals
    s = train.train(tiny_cfg(data_root, tmp_path / "ft", init_from=str(tmp_path / "pre" / "best.pt"),
                             learning_rate=0.0, min_lr=0.0, max_iters=50, eval_interval=5, patience=2))
    assert s["evals"][0][1] == pytest.approx(ck["best_val"], abs=1e-6)
    assert s["stopped_early"] and [st for st, _ in s["evals"]] == [0, 5, 10] and s["step"] == 10
    with pytest.raises(ValueError, match="different architecture"):
        checkpoint.check_weights(small_model("gpt2"), ck["model"])


def test_bad_data_rejected_before_training(data_root, tmp_path):
    with pytest.raises(common.UserError, match="prepare.py"):
        train.train(tiny_cfg(tmp_path, tmp_path / "o", dataset="nothing_here"))
    with pytest.raises(ValueError, match="block_size"):
        train.train(tiny_cfg(data_root, tmp_path / "o", block_size=500_000))
    with pytest.raises(ValueError, match="smaller than the dataset's vocabulary"):
        train.train(tiny_cfg(data_root, tmp_path / "o", vocab_size=200))
    bad = tmp_path / "bad" / "trunc"
    bad.mkdir(parents=True)
    for f in ("meta.json", "train.bin", "val.bin"):
        (bad / f).write_bytes((Path(data_root) / "pystdlib" / f).read_bytes()[:1000 if f == "val.bin" else None])
    with pytest.raises(ValueError, match="truncated"):
        train.train(tiny_cfg(tmp_path / "bad", tmp_path / "o", dataset="trunc"))


def test_sample_cli(data_root, tmp_path):
    train.train(tiny_cfg(data_root, tmp_path, max_iters=5, eval_interval=5))
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={tmp_path}", "--start=def ",
                        "--num_samples=2", "--max_new_tokens=20", "--temperature=0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    samples = [s for s in r.stdout.split("\n") if s.startswith("def ")]
    assert len(samples) == 2 and samples[0] == samples[1]  # greedy: the same both times
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={tmp_path / 'nope.pt'}"], capture_output=True, text=True)
    assert r.returncode != 0 and "no checkpoint in" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# watching a run: bits per byte, samples, the wandb and TensorBoard sinks, plot.py

def test_bits_per_byte_on_the_bytes_corpus(data_root, tmp_path):
    """On the bytes corpus a token is a byte, but for the separator after each document (it has no bytes)."""
    train.train(tiny_cfg(data_root, tmp_path, max_iters=4, eval_interval=4, warmup_iters=2))
    val_files = [f for _, f in prepare.pystdlib_files()[::prepare.VAL_EVERY]]
    nbytes = sum(len(Path(f).read_bytes().decode("utf-8", errors="replace").encode()) for f in val_files)
    evals = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    for r in evals:  # nats per byte, over ln 2
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * (nbytes + len(val_files)) / nbytes / np.log(2), rel=1e-12)


def test_bits_per_byte_on_gpt2_by_hand(gpt2, tmp_path):
    texts = [f"# módulo {i}: ünïcode ✓ — 日本語\ndef f{i}(x):\n    return x * {i} + len('{'é' * i}')\n" * 3 for i in range(40)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    folder = prepare.prepare("g", [str(tmp_path / "in.jsonl")], tokenizer="gpt2", out_dir=tmp_path / "data", quiet=True)
    val = [t for i, t in enumerate(texts) if i % prepare.VAL_EVERY == 0]
    nbytes, ntokens = sum(len(t.encode("utf-8")) for t in val), sum(len(gpt2.encode(t)) + 1 for t in val)  # + separator
    meta = data.load_meta(folder)
    assert (meta["val_bytes"], meta["val_tokens"]) == (nbytes, ntokens) and nbytes > len("".join(val))  # bytes, not characters
    # a corpus prepared before these keys: counted by decoding, once, and cached in meta.json
    Path(folder, "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.endswith("_bytes")}))
    assert data.max_ids(folder) == meta == data.load_meta(folder)
    train.train(tiny_cfg(tmp_path / "data", tmp_path / "out", dataset="g", n_layer=1, n_embd=16, block_size=32,
                         batch_size=2, max_iters=1, eval_interval=1, eval_iters=1, warmup_iters=0))
    evals = [r for r in map(json.loads, open(tmp_path / "out" / "log.jsonl")) if "val_loss" in r]
    assert len(evals) == 2 and evals[0]["val_loss"] > 10  # ln(50257) = 10.8: the loss is per gpt2 token
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * ntokens / nbytes / np.log(2), rel=1e-12)


def test_sample_every_logs_greedy_continuation_and_mask_fill(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path / "clm", max_iters=10, eval_interval=10, log_interval=5, sample_every=5))
    samples = [r for r in map(json.loads, open(tmp_path / "clm" / "log.jsonl")) if "sample" in r]
    assert [r["step"] for r in samples] == [5, 10]
    prompt = torch.from_numpy(data.load_split(data_root / "pystdlib", "val")[:logger.SAMPLE_PROMPT].astype(np.int64))[None]
    out = s["model"].eval().generate(prompt, logger.SAMPLE_TOKENS, temperature=0, use_cache=False)[0].tolist()  # the final model
    tok = prepare.get_tokenizer("bytes")
    assert samples[-1]["sample"] == f"{tok.decode(out[:32])!r} -> {tok.decode(out[32:])!r}" and out[:32] == prompt[0].tolist()
    # BERT: the first validation pair, its masked tokens filled in, scored against the truth
    s = train.train(tiny_cfg(data_root, tmp_path / "mlm", **{**BERT_CFG, "batch_size": 4, "eval_iters": 1, "warmup_iters": 2},
                             max_iters=4, eval_interval=4, sample_every=4))
    sample = [r for r in map(json.loads, open(tmp_path / "mlm" / "log.jsonl")) if "sample" in r][0]["sample"]
    meta = data.load_meta(data_root / "pystdlib")
    b = data.eval_batch(data.encoder_corpus(data_root / "pystdlib", "val", meta, "mlm_nsp"), "mlm_nsp", 64, range(1), 1)
    with torch.no_grad():
        (mlm, _), _ = s["model"].eval()(**data.to_device(b, torch.device("cpu")))
    t = torch.from_numpy(b["targets"])
    truth, pred = t.gather(1, M.mlm_positions(t)), mlm[..., :256].argmax(-1)  # bytes 0..255: text; 256 is the separator
    n = int((truth != -1).sum())
    assert f"({int(((pred == truth) & (truth != -1)).sum())}/{n} masked tokens right, next sentence " in sample
    assert sample.count("«") == sample.count("»") and 1 <= sample.count("«") <= n and " [SEP] " in sample


def _wandb_history(run_dir):
    """The records a wandb offline run holds (its .wandb file: LevelDB log blocks of protobuf Records):
    (config, [history rows without wandb's own _keys])."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, piece, config, rows = next(Path(run_dir).glob("run-*.wandb")).read_bytes(), 7, b"", {}, []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        piece, pos = piece + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(piece)
            piece = b""
            items = lambda its: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in its}
            if rec.HasField("run"):
                config.update(items(rec.run.config.update))
            if rec.HasField("config"):
                config.update(items(rec.config.update))
            if rec.HasField("history"):
                rows.append({k: v for k, v in items(rec.history.item).items() if not k.startswith("_")})
    return config, rows


def test_wandb_sink_offline_same_records_and_resume(data_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(data_root, tmp_path, max_iters=4, eval_interval=2, log_interval=2, lr_decay_iters=8, wandb_log=True)
    train.train(cfg)
    run_id = (tmp_path / "wandb_id").read_text()
    train.train(dict(cfg, max_iters=8, init_from="resume"))  # the same wandb run continues
    assert (tmp_path / "wandb_id").read_text() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for run, part in zip(runs, (log[:6], log[6:])):  # provenance, val 0, train 2, val 2, train 4, val 4 | provenance, train 6...
        config, rows = _wandb_history(run)
        assert config["learning_rate"] == cfg["learning_rate"] and config["torch"] == torch.__version__
        by_step = {}
        for rec in part[1:]:  # wandb joins the records of a step into one row
            by_step.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
        assert rows == list(by_step.values())


def test_tensorboard_sink_same_records(data_root, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.train(tiny_cfg(data_root, tmp_path, max_iters=6, eval_interval=3, log_interval=2, tensorboard_dir=str(tmp_path / "tb")))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for key in ("loss", "lr", "tok_s", "val_loss", "val_bpb"):
        want = [(r["step"], r[key]) for r in log if key in r]
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(k, pytest.approx(v, rel=1e-6)) for k, v in want], key
    assert len(want) == 3 and "provenance/text_summary" in events.Tags()["tensors"]


def test_sinks_rank_0_only_and_missing_package_named(data_root, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(data_root, tmp_path, wandb_log=True, tensorboard_dir=str(tmp_path / "tb"))
    with logger.open_sinks(cfg, train.Runtime(torch.device("cpu"), torch.float32, rank=1, world=2), None) as sinks:
        assert sinks == []
    assert list(tmp_path.iterdir()) == []
    real = logger.importlib.util.find_spec
    monkeypatch.setattr(logger.importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    for arg, package in (("--wandb_log=True", "wandb"), (f"--tensorboard_dir={tmp_path / 'tb'}", "tensorboard")):
        status, err = main_fails([arg], data_root, tmp_path, monkeypatch, capsys)
        assert status == 2 and err.count("\n") == 1 and f"pip install {package}" in err


def _two_runs(data_root, root):
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        train.train(tiny_cfg(data_root, root / name, max_iters=10, eval_interval=5, log_interval=2, learning_rate=lr, min_lr=1e-4))
    with open(root / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 2.1')  # a run killed mid-write
    return [[json.loads(line) for line in (root / name / "log.jsonl").read_text().splitlines()[:n]] for name, n in (("a", None), ("b", -1))]


def test_plot_two_runs_one_torn(data_root, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    import plot
    logs = _two_runs(data_root, tmp_path)
    fig = plot.plot([str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl")], str(tmp_path / "p.png"))
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 rows of 3 panels (loss, loss against time, bits per byte; lr, tok/s, MFU), the legend below: 2 runs + 1 rows
    assert struct.unpack(">II", png[16:24]) == (1500, round((2 * 3.4 + 3 * 0.22) * 100))
    loss_ax, time_ax = fig.axes[:2]
    lines = [ln for ln in loss_ax.get_lines() if ln.get_lw() == 1.5]  # the smoothed training loss, one per run
    assert [t.get_text() for t in fig.legends[0].get_texts() + fig.legends[1].get_texts()] == [
        "a (learning_rate=0.003)", "b (learning_rate=0.001)"]
    for line, log in zip(lines, logs):
        train_recs = [r for r in log if "loss" in r]
        assert list(line.get_xdata()) == [r["step"] for r in train_recs] == [2, 4, 6, 8, 10]
        assert line.get_ydata()[0] == pytest.approx(train_recs[0]["loss"])
    val_lines = [ln for ln in time_ax.get_lines() if ln.get_marker() == "o"]
    assert [list(ln.get_xdata()) for ln in val_lines] == [[r["elapsed_s"] / 60 for r in log if "val_loss" in r] for log in logs]
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_reads_a_resumed_log_as_one_run(tmp_path):
    import plot
    prov = lambda init: {"torch": "x", "config": {"init_from": init, "learning_rate": 1e-3}}
    lines = [prov("scratch")] + [{"step": k, "loss": 5 - k / 10, "elapsed_s": k} for k in range(0, 31, 10)]  # killed at 30
    lines += [prov("resume")] + [{"step": k, "loss": 4 - k / 10, "elapsed_s": k - 19} for k in (30, 40)]  # from a checkpoint at 20
    lines += [{"step": 40, "val_loss": 1.0, "elapsed_s": 22}, {"step": 40, "sample": "x"}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{torn")
    p, train_recs, val_recs = plot.read_log(tmp_path / "log.jsonl")
    assert p == prov("scratch") and list(train_recs) == [0, 10, 20, 30, 40] and list(val_recs) == [40]
    assert [r["loss"] for r in train_recs.values()] == [5, 4, 3, 1, 0]  # the resumed run's steps replace the others
    assert [r["elapsed_s"] for r in train_recs.values()] == [0, 10, 20, 41, 51] and val_recs[40]["elapsed_s"] == 52
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + [prov("scratch"), lines[1]]))
    assert list(plot.read_log(tmp_path / "log.jsonl")[1]) == [0]  # a fresh run in the same folder starts over


def test_plot_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import plot
    assert plot.main([str(tmp_path)]) == 2 and "no log.jsonl at" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text(json.dumps({"torch": "x", "config": {}}) + "\n")
    assert plot.main([str(tmp_path)]) == 2 and "holds no records of a run yet" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text(json.dumps({"torch": "x", "config": {}}) + "\n" + json.dumps({"step": 1, "loss": 2.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err


# ------------------------------------------------------------------------------------------------
# prepare.py

def _docs(arr, sep_id):
    """Split a .bin array into its documents (each one separator-terminated)."""
    assert len(arr) == 0 or arr[-1] == sep_id
    cuts = np.flatnonzero(arr == sep_id)
    return np.split(arr, cuts + 1)[:-1]


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
        assert meta[f"{split}_bytes"] == sum(len(Path(f).read_bytes().decode("utf-8", errors="replace").encode()) for _, f in expect)
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


def test_bytes_tokenizer():
    tok = prepare.get_tokenizer("bytes")
    s = "héllo ✓ wörld"
    assert tok.encode(s) == list(s.encode("utf-8"))
    assert tok.decode(tok.encode(s) + [256, 300]) == s  # separator and out-of-range ids dropped
    with pytest.raises(ValueError, match="gpt2"):  # an unknown name lists the valid ones
        prepare.get_tokenizer("no-such-tokenizer")


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
    assert meta["train_bytes"] == sum(len(t.encode("utf-8")) for i, t in enumerate(texts) if i % 20)  # for bits per byte
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
    s = train.train(tiny_cfg(tmp_path / "data", tmp_path / "out", dataset="bpe", block_size=32, max_iters=4, eval_interval=4,
                             warmup_iters=1))
    assert s["model"].cfg.vocab_size == 261  # the model's vocabulary follows the tokenizer
    (tmp_path / "bad.model").write_text("not a bpe file\n")
    with pytest.raises(common.UserError, match="not a tiktoken BPE file"):
        prepare.get_tokenizer(str(tmp_path / "bad.model"))


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
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"no_text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare.prepare("y", [str(tmp_path / "ok.txt"), str(tmp_path / "bad.jsonl")],
                        out_dir=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in (tmp_path / "out" / "y").iterdir()) == ["train.bin", "val.bin"]


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
            (root / f"{j}.jsonl{'.gz' if kind == 'gz' else ''}").write_bytes(gzip.compress(raw) if kind == "gz" else raw)
    return [str(root)], {}


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


@pytest.mark.parametrize("kind,module,pip", [("parquet", "pyarrow.parquet", "pyarrow"), ("zst", "zstandard", "zstandard"),
                                             ("hf", "datasets", "datasets"), ("json", "tokenizers", "tokenizers")])
def test_optional_packages_named_before_anything_is_written(tmp_path, monkeypatch, kind, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    inputs = {"parquet": ["a.parquet"], "zst": ["a.jsonl.zst"]}.get(kind, ["tokenizer.json"])
    kw = dict(hf_dataset=str(tmp_path)) if kind == "hf" else dict(tokenizer=str(tmp_path / "tokenizer.json")) if kind == "json" else {}
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
    folder = prepare.prepare("t", [str(tmp_path / "in.jsonl")], tokenizer="gpt2", out_dir=tmp_path, workers=workers, quiet=True)
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
    same(Path(prepare.prepare("three", [str(path["a"]), str(path["b"]), str(path["c"])], val_fraction=0.1, val_docs=4, **opts)), two)
    with pytest.raises(common.UserError, match="val_fraction=0.1, this run asks for 0.5"):
        prepare.prepare("two", [str(path["c"])], append=True, val_fraction=0.5, **opts)
    with pytest.raises(common.UserError, match="drop --append"):
        prepare.prepare("none", [str(path["c"])], append=True, **opts)


def test_progress_line(tmp_path, monkeypatch, capsys):
    """A long input reports documents, tokens, MB/s and an ETA on stderr, a line every few seconds."""
    monkeypatch.setattr(prepare, "REPORT_AFTER", 0)  # the first line at once; the next one 5 s later at the earliest
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": "x" * 1000}) + "\n" for _ in range(50)))
    prepare.prepare("p", [str(tmp_path / "in.jsonl")], out_dir=tmp_path, quiet=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: 1 docs, 1,001 tokens, ") and " MB/s, " in err[0], err
    assert "%, ETA " in err[0]


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
    s = train.train(tiny_cfg(tmp_path / "data", tmp_path / "out", dataset="h", block_size=32, max_iters=2, eval_interval=2,
                             warmup_iters=1))
    assert s["model"].cfg.vocab_size == tok.vocab_size and np.isfinite(s["train_losses"]).all()
    _hf_tokenizer_file(tmp_path / "noeos", eos="<none>")
    (tmp_path / "noeos" / "tokenizer.json").write_text((tmp_path / "noeos" / "tokenizer.json").read_text().replace("</s>", "<x>"))
    with pytest.raises(common.UserError, match="no end-of-document token"):
        prepare.get_tokenizer(str(tmp_path / "noeos" / "tokenizer.json"))


def test_hf_export_carries_the_tokenizer_json(tmp_path):
    """A model trained on a tokenizer.json corpus exports with that tokenizer, as transformers and lm-eval need it."""
    pytest.importorskip("safetensors", reason="safetensors is optional: pip install safetensors")
    _, path = _hf_tokenizer_file(tmp_path / "tok")
    hf.export(small_model("llama"), {"meta": {"tokenizer": str(path)}}, str(tmp_path / "out"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()

def test_pad_vocab_to(data_root, tmp_path, monkeypatch, capsys):
    """pad_vocab_to rounds the vocabulary the model takes from the tokenizer up (257 bytes -> 320; 261 with
    BERT's specials -> 320); an explicit vocab_size is kept; the padded rows are never sampled."""
    meta = data.load_meta(data_root / "pystdlib")
    pad = lambda **kw: train.model_config(dict(train.DEFAULTS, pad_vocab_to=64, **kw), meta).vocab_size  # noqa: E731
    assert (pad(), pad(objective="mlm_nsp", model="bert-tiny"), pad(vocab_size=300)) == (320, 320, 300)
    s = train.train(tiny_cfg(data_root, tmp_path, pad_vocab_to=64, max_iters=2, eval_interval=2, warmup_iters=1))
    net = s["model"].eval()
    assert net.cfg.vocab_size == 320 and net.lm_head.weight.shape[0] == 320
    net.lm_head.register_forward_hook(lambda m, i, out: out + 1e4 * (torch.arange(320) >= 257))  # padding would win
    x = torch.tensor([[10, 100]])
    assert (net.generate(x, 8, temperature=1.0)[0, 2:] >= 257).all()  # (the hook bites)
    assert (net.generate(x, 8, temperature=1.0, vocab=257)[0, 2:] < 257).all()
    import sample
    widths = []
    real = M.sample_next
    monkeypatch.setattr(M, "sample_next", lambda logits, *a: widths.append(logits.size(-1)) or real(logits, *a))
    assert sample.main([f"--ckpt={tmp_path}", "--max_new_tokens=3", "--num_samples=1", "--device=cpu"]) == 0
    assert widths == [257] * 3  # sample.py draws from the tokenizer's ids only


def test_recipe_configs_run(tmp_path, monkeypatch):
    """Every config file trains 2 steps on CPU, as written but for sizes, device and step counts, on a tiny
    stand-in for its corpus (bytes; labelled for objective='classify'). The configs that fine-tune run after
    the others, from the checkpoints those wrote to the paths they name."""
    monkeypatch.chdir(tmp_path)  # configs name relative out_dir and init_from paths
    monkeypatch.setattr(logger, "peak_flops", lambda *a: (1e12, "not measured"))  # saves a second per run
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 8,
                                                           "label": "even" if i % 2 else "odd"}) + "\n" for i in range(40)))
    plain = Path(prepare.prepare("plain", [str(tmp_path / "in.jsonl")], out_dir=tmp_path / "data", quiet=True))
    labelled = Path(prepare.prepare_classify("labelled", [str(tmp_path / "in.jsonl")], out_dir=tmp_path / "data", quiet=True))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"source": f"def f{i}(x, y{i}):", "target": f"x y{i}"}) + "\n" for i in range(400)))
    pairs = Path(prepare.prepare_seq2seq("pairs", [str(tmp_path / "pairs.jsonl")], out_dir=tmp_path / "data", quiet=True))
    small = dict(n_layer=1, n_head=2, n_kv_head=0, n_embd=32, ffn_hidden=0, block_size=64)
    steps = dict(seq_len=0, max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=1, log_interval=1, batch_size=2, device="cpu",
                 dtype="float32", compile=False, parallel="single", threads=1, data_root="data")
    configs = sorted((REPO / "config").glob("*.py"), key=lambda p: (train.get_config([str(p)])["init_from"] != "scratch", p.name))
    assert len(configs) >= 7
    for path in configs:
        cfg = train.get_config([str(path)])
        scratch = cfg["init_from"] == "scratch"
        if not (tmp_path / "data" / cfg["dataset"]).exists():
            stand_in = {"classify": labelled, "seq2seq": pairs}.get(cfg["objective"], plain)
            shutil.copytree(stand_in, tmp_path / "data" / cfg["dataset"])
        sizes = {**small, **({"n_dec_layer": 1} if cfg["objective"] in data.T5_OBJECTIVES else {})} if scratch else {}
        cfg = train.get_config([str(path)] + [f"--{k}={v}" for k, v in {**sizes, **steps}.items()])
        s = train.train(cfg)
        assert s["step"] == 2 and len(s["evals"]) == 2 and np.isfinite(s["train_losses"]).all(), path.name
        specials = data.extra_tokens(cfg["objective"])
        if scratch:  # the architecture is the preset's, the vocabulary the config's or the corpus's
            expect = {**M.PRESETS[cfg["model"]], **{k: cfg[k] for k in train.MODEL_KEYS if cfg.get(k) is not None}}
            assert all(getattr(s["model"].cfg, k) == v for k, v in expect.items() if k not in sizes and k != "vocab_size")
            assert s["model"].cfg.vocab_size == (cfg["vocab_size"] or data.model_vocab(257 + specials, cfg["pad_vocab_to"]))


# ------------------------------------------------------------------------------------------------
# distributed: 2 ranks on CPU with gloo, launched with torchrun from the test. A launch costs ~8 s,
# so each launch runs several checks (dist_worker below) and writes results for the test to compare.

DIST = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64, batch_size=4, gradient_accumulation_steps=2,
            max_iters=6, eval_interval=3, eval_iters=2, warmup_iters=2, lr_decay_iters=8, threads=1)


def full_state(model):
    """The whole (unsharded) state dict on every rank, as plain CPU tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def dist_worker(phase, data_root, out):
    """Runs under torchrun (2 ranks); results go to out/ as .pt files written by rank 0."""
    out = Path(out)
    rank = int(os.environ["RANK"])
    res = {}

    def run(name, **kw):
        cfg = tiny_cfg(data_root, out / name, **{**DIST, **kw})
        s = train.train(cfg)
        res[name] = {"losses": s["train_losses"], "evals": s["evals"], "state": full_state(s["model"])}

    if phase == "1":
        run("ddp", parallel="ddp")
        run("fsdp", parallel="fsdp")
        seen, rope = set(), M.apply_rope  # what RoPE's tables look like inside an FSDP block in bf16
        M.apply_rope = lambda x, cos, sin: seen.add((x.dtype, cos.dtype)) or rope(x, cos, sin)
        run("fsdp_bf16", parallel="fsdp", dtype="bfloat16")
        M.apply_rope, res["rope_dtypes"] = rope, sorted(map(str, seen))
        run("fsdp_step_sync", parallel="fsdp", fsdp_grad_sync="step")  # reduce-scatter once per step
        run("fsdp_ac", parallel="fsdp", activation_checkpointing="full")
        run("fsdp_ckpt", parallel="fsdp", max_iters=3)  # leaves out/fsdp_ckpt/ckpt.dcp at step 3
        run("ddp_muon", parallel="ddp", optimizer="muon", lr_schedule="wsd")
        # meta-device init, sharded, equals a single-process init with the same seed
        cfg = tiny_cfg(data_root, out, **DIST)
        mcfg = M.config_from_preset("tiny", **{k: DIST[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "block_size")})
        m = train.build_model(cfg, mcfg, train.Runtime(torch.device("cpu"), torch.float32, rank, 2, "fsdp"))
        res["init"] = full_state(m)
        res["init_local"] = {n: tuple(p.to_local().shape) for n, p in m.named_parameters()}
        # LLaMA-7B: sharded on the meta device; nothing is materialised
        import resource
        with torch.device("meta"):
            big = M.Transformer(M.config_from_preset("llama-7b"))
        from torch.distributed.fsdp import fully_shard
        for block in big.blocks:
            fully_shard(block)
        fully_shard(big)
        res["7b"] = {"params": {n: (tuple(p.shape), tuple(p.to_local().shape), p.to_local().is_meta)
                                for n, p in big.named_parameters()},
                     "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    elif phase == "hf":  # init_from='hf:DIR' under FSDP: each rank reads only its own chunks
        import hf
        load, rows = hf.load_checkpoint, {}
        hf.load_checkpoint = lambda *a: (lambda ck: rows.update({k: v.shape[0] for k, v in ck["model"].items()}) or ck)(load(*a))
        run("hf", parallel="fsdp", init_from=f"hf:{out / 'hf_llama'}", max_iters=0, n_layer=None, n_embd=None, n_head=None,
            n_kv_head=None, block_size=None)
        res["rows"] = rows
        run("hf_ckpt", parallel="fsdp", init_from=f"hf:{out / 'hf_llama'}", max_iters=1, warmup_iters=0, n_layer=None,
            n_embd=None, n_head=None, n_kv_head=None, block_size=None)  # leaves a sharded best.dcp to export
    elif phase == "die":  # rank 1 dies at its 3rd batch; rank 0 must not hang in the next collective
        if rank == 1:
            calls, real = [0], data.windows
            def dying(*a):
                calls[0] += 1
                if calls[0] == 3:
                    os._exit(17)
                return real(*a)
            data.windows = dying
        run("die", parallel="ddp", dist_timeout_minutes=1, max_iters=50)
    else:  # a fresh launch resumes what phase 1 and the single-process test left behind
        run("fsdp_ckpt", parallel="fsdp", init_from="resume")
        run("single_to_fsdp", parallel="fsdp", init_from="resume")
    if rank == 0:
        torch.save(res, out / f"phase{phase}.pt")


def run_ranks(*args):
    """This file under torchrun with 2 ranks of one thread: its __main__ runs the worker args name."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "test_model.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def torchrun(phase, data_root, out):
    run_ranks("dist", phase, data_root, out)
    return torch.load(Path(out) / f"phase{phase}.pt", weights_only=True)


DIST_MODES = (("ddp", dict(parallel="ddp")), ("fsdp", dict(parallel="fsdp")),
              ("fsdp_bf16_ac", dict(parallel="fsdp", dtype="bfloat16", activation_checkpointing="full")))


def modes_worker(make_cfg, record, out, file):
    """On each rank: a run per DIST_MODES entry (make_cfg(its out_dir, **its keys)), and rank 0 saves
    {mode: record(summary)} to out/file for the test to compare with a single process."""
    res = {name: record(train.train(make_cfg(Path(out) / name, **kw))) for name, kw in DIST_MODES}
    if int(os.environ["RANK"]) == 0:
        torch.save(res, Path(out) / file)


def assert_close_states(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def test_distributed_matches_single_process(data_root, tmp_path):
    one = train.train(tiny_cfg(data_root, tmp_path / "single", **{**DIST, "batch_size": 8}))  # same global batch
    single = {"losses": one["train_losses"], "state": {k: v.clone() for k, v in one["model"].state_dict().items()}}
    # the single process also checkpoints at step 3, for phase 2 to resume under FSDP (.pt -> sharded)
    train.train(tiny_cfg(data_root, tmp_path / "single_to_fsdp", **{**DIST, "max_iters": 3, "batch_size": 8}))
    p1 = torchrun("1", data_root, tmp_path)

    for name in ("ddp", "fsdp", "fsdp_ac", "fsdp_step_sync"):
        np.testing.assert_allclose(p1[name]["losses"], single["losses"], atol=1e-5, rtol=0, err_msg=name)
        assert_close_states(p1[name]["state"], single["state"], atol=1e-4)
    np.testing.assert_allclose(p1["fsdp_bf16"]["losses"], single["losses"], atol=5e-3, rtol=0)
    muon = train.train(tiny_cfg(data_root, tmp_path / "single_muon", **{**DIST, "batch_size": 8}, optimizer="muon", lr_schedule="wsd"))
    # Muon's Newton-Schulz runs in bf16: the all-reduce's last-bit differences flip some bf16 roundings, measured
    # measured as 3e-5 in the loss; the iteration (slope ~3.4 at 0, 5 steps) amplifies them in a matrix's small
    # singular directions, so weights differ by up to ~2% of a small matrix's norm after 6 steps: the losses are compared
    np.testing.assert_allclose(p1["ddp_muon"]["losses"], muon["train_losses"], atol=1e-4, rtol=0)
    assert not np.allclose(muon["train_losses"], single["losses"])  # (Muon did step differently from AdamW)
    assert p1["rope_dtypes"] == ["(torch.bfloat16, torch.float32)"]  # bf16 activations, RoPE tables kept fp32  # bf16 compute, fp32 master weights and reduction: measured within 2.3e-3

    # initialisation: sharded on meta, materialised, equal to single-process init; each rank holds half
    init = M.Transformer(M.config_from_preset("tiny", **{k: DIST[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "block_size")}))
    init.init_weights(DIST.get("seed", train.DEFAULTS["seed"]))
    assert_close_states(p1["init"], init.state_dict(), atol=0)
    assert p1["init_local"]["blocks.0.attn.kv.weight"] == (32, 64)  # 64 rows of K and V, split across 2 ranks

    # llama-7b: every parameter sharded in half along dim 0, nothing allocated
    params = p1["7b"]["params"]
    assert len(params) == 32 * 7 + 3
    for name, (full, local, is_meta) in params.items():
        assert local[0] == (full[0] + 1) // 2 and local[1:] == full[1:] and is_meta, name
    assert p1["7b"]["maxrss_mb"] < 4000  # the full model would be 27,000 MB in fp32

    # resume: FSDP at step 3 -> a fresh 2-rank launch, and -> a single process; single .pt -> FSDP
    import shutil
    shutil.copytree(tmp_path / "fsdp_ckpt", tmp_path / "fsdp_ckpt_ws1")  # phase 2 moves the original on
    p2 = torchrun("2", data_root, tmp_path)
    fsdp_resumed = p1["fsdp_ckpt"]["losses"] + p2["fsdp_ckpt"]["losses"]
    assert fsdp_resumed == p1["fsdp"]["losses"]  # exact, bit for bit
    assert_close_states(p2["fsdp_ckpt"]["state"], p1["fsdp"]["state"], atol=0)
    np.testing.assert_allclose(p2["single_to_fsdp"]["losses"], single["losses"][3:], atol=1e-5, rtol=0)
    ws1 = train.train(tiny_cfg(data_root, tmp_path / "fsdp_ckpt_ws1", **{**DIST, "batch_size": 8, "init_from": "resume"}))
    np.testing.assert_allclose(ws1["train_losses"], single["losses"][3:], atol=1e-5, rtol=0)


def test_one_host_read_per_step(data_root, tmp_path, monkeypatch):
    """Every device-to-host read made by anvil's own code goes through to_host: one per training step
    (the loss and the step's flags, together) and one per evaluation. Reads inside PyTorch are not counted,
    nor data.py's, whose tensors never leave the host."""
    reads, calls, real_to_host = [], [], train.to_host
    monkeypatch.setattr(logger, "peak_flops", lambda *a, **k: (1e12, "fixed"))  # no start-up matmul timing
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        def spy(self, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            if sys._getframe(1).f_globals.get("__name__") in ("train", "model", "common", "logger"):
                reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    for module in (train, logger):
        monkeypatch.setattr(module, "to_host", lambda t: calls.append(1) or real_to_host(t))
    s = train.train(tiny_cfg(data_root, tmp_path, max_iters=6, eval_interval=1000, log_interval=3,
                             gradient_accumulation_steps=2, save_checkpoints=False))
    assert len(s["train_losses"]) == 6 and len(s["evals"]) == 2
    assert len(calls) == 6 + 2 and reads == ["tolist"] * len(calls)


def test_device_and_dtype_resolution():
    """Pure functions of what was asked for and what the machine has: every CUDA device carries an index."""
    rd = common.resolve_device
    machines = {"cpu only": dict(), "1 gpu": dict(cuda=True, n_cuda=1), "2 gpus": dict(cuda=True, n_cuda=2),
                "mac": dict(mps=True)}
    launches = {"single": dict(), "ddp/fsdp rank 1 of 2": dict(local_world=2, local_rank=1)}
    expect = {  # (machine, launch): device for auto, cpu, cuda, cuda:1, mps (an exception's text when refused)
        ("cpu only", "single"): ["cpu", "cpu", "no CUDA device", "no CUDA device", "MPS is not available"],
        ("1 gpu", "single"): ["cuda:0", "cpu", "cuda:0", "there are 1", "MPS is not available"],
        ("2 gpus", "single"): ["cuda:0", "cpu", "cuda:0", "cuda:1", "MPS is not available"],
        ("mac", "single"): ["mps", "cpu", "no CUDA device", "no CUDA device", "mps"],
        ("cpu only", "ddp/fsdp rank 1 of 2"): ["cpu", "cpu", "no CUDA device", "no CUDA device", "MPS is not available"],
        ("1 gpu", "ddp/fsdp rank 1 of 2"): ["there are 1", "cpu", "there are 1", "names one GPU", "MPS is not available"],
        ("2 gpus", "ddp/fsdp rank 1 of 2"): ["cuda:1", "cpu", "cuda:1", "names one GPU", "MPS is not available"],
        ("mac", "ddp/fsdp rank 1 of 2"): ["mps", "cpu", "no CUDA device", "no CUDA device", "mps"],
    }
    for (machine, launch), want in expect.items():
        for req, w in zip(("auto", "cpu", "cuda", "cuda:1", "mps"), want):
            try:
                got = rd(req, **machines[machine], **launches[launch])
            except ValueError as e:
                got = str(e)
            assert w in got and (got.startswith(("cpu", "mps", "cuda:")) == (w == got)), (machine, launch, req, got)
    with pytest.raises(ValueError, match="not one of"):
        rd("tpu")
    dt = common.resolve_dtype
    for parallel in ("single", "ddp", "fsdp"):
        assert dt("auto", "cuda", parallel, bf16=True) == "bfloat16" and dt("auto", "cpu", parallel) == "float32"
        assert dt("auto", "mps", parallel) == "float32" and dt("float32", "cuda", parallel, bf16=True) == "float32"
        with pytest.raises(ValueError, match="needs a GPU|FSDP"):
            dt("float16", "cpu", parallel)
    assert dt("auto", "cuda", "ddp", bf16=False) == "float16"  # a V100
    with pytest.raises(ValueError, match="FSDP"):
        dt("auto", "cuda", "fsdp", bf16=False)
    with pytest.raises(ValueError, match="not supported by Tesla V100"):
        dt("bfloat16", "cuda", "single", bf16=False, device_name="Tesla V100")


def test_hf_import_under_fsdp_reads_only_local_shards(data_root, tmp_path):
    t = hf_libs()
    torch.manual_seed(0)
    ref = perturb(t.LlamaForCausalLM(t.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)))
    ref.save_pretrained(tmp_path / "hf_llama")
    single, _ = from_hf(tmp_path / "hf_llama")
    p = torchrun("hf", data_root, tmp_path)
    assert_close_states(p["hf"]["state"], single.state_dict(), atol=0)  # the same weights as a single process
    assert p["rows"]["tok_emb.weight"] == 150 and p["rows"]["blocks.0.attn.kv.weight"] == 16  # half of 300, of 32
    import sample  # a sharded FSDP checkpoint exports straight to a Hugging Face folder
    assert sample.main([f"--ckpt={tmp_path / 'hf_ckpt' / 'best.dcp'}", f"--export_hf={tmp_path / 'out_hf'}"]) == 0
    back, info = t.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out_hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    net, _ = sample.load_model(str(tmp_path / "hf_ckpt" / "best.dcp"))
    assert logit_gap(net, back.eval(), torch.randint(0, 300, (2, 24))) < 1e-5


def test_activation_checkpointing_same_loss_and_grads():
    cfg = dict(train.DEFAULTS, activation_checkpointing="full", compile=False)
    mcfg = M.ModelConfig(**SMALL["llama"])
    plain = train.build_model(dict(cfg, activation_checkpointing="none"), mcfg, CPU)
    ac = train.build_model(cfg, mcfg, CPU)
    assert list(ac.state_dict()) == list(plain.state_dict())  # names unchanged by the wrapper
    x = torch.randint(0, 97, (2, 32))
    losses = []
    for m in (plain, ac):
        _, loss = m(x, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (n, p), q in zip(plain.named_parameters(), ac.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


# ------------------------------------------------------------------------------------------------
# encoder objectives (BERT): batches, model, training, fine-tuning

BERT_SMALL = dict(M.PRESETS["bert-tiny"], vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)


def bert_small(seed=0, **kw):
    torch.manual_seed(seed)
    return M.Transformer(M.ModelConfig(**{**BERT_SMALL, **kw})).eval()


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
    c = data.encoder_corpus(data_root / "pystdlib", "train", meta, "mlm_nsp")
    base, sp = meta["vocab_size"], data.special_ids(meta["vocab_size"])
    b = data.encoder_batch(c, 64, "mlm_nsp", range(3000), seed=1, step=7)
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
    again = data.encoder_batch(c, 64, "mlm_nsp", range(2990, 3000), seed=1, step=7)
    assert all(np.array_equal(again[k], b[k][2990:]) for k in b)
    other = data.encoder_batch(c, 64, "mlm_nsp", range(2990, 3000), seed=1, step=8)
    assert not np.array_equal(other["idx"], again["idx"])
    ev = data.encoder_batch(c, 64, "mlm_nsp", range(5))
    assert all(np.array_equal(ev[k], data.encoder_batch(c, 64, "mlm_nsp", range(5))[k]) for k in ev)


def test_nsp_pairs(lines_corpus):
    folder, meta, docs = lines_corpus
    c = data.encoder_corpus(folder, "train", meta, "mlm_nsp")
    base, sp, T = meta["vocab_size"], data.special_ids(meta["vocab_size"]), 96
    b = data.encoder_batch(c, T, "mlm_nsp", range(2000), seed=3, step=0)
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


def test_newline_table_tiktoken(gpt2):
    tok = gpt2
    table = data.newline_tokens({"tokenizer": "gpt2", "vocab_size": 50257, "sep_id": 50256})
    ids = tok.encode("def f(x):\n    return x\n\n")
    assert [bool(table[i]) for i in ids] == ["\n" in tok.decode([i]) for i in ids] and table[ids].sum() == 2
    assert table.sum() >= 2 and not table[50256]


def test_bidirectional_and_padding_invariance():
    m = bert_small()
    x = torch.randint(0, 97, (2, 20))
    types = torch.zeros_like(x)
    types[:, 10:] = 1
    (mlm, nsp), _ = m(x, token_type_ids=types)
    y = x.clone()
    y[:, 15] = (y[:, 15] + 1) % 97  # a later token changes the outputs before it
    (mlm2, nsp2), _ = m(y, token_type_ids=types)
    assert not torch.allclose(mlm[:, :15], mlm2[:, :15]) and not torch.allclose(nsp, nsp2)
    # [PAD] after the sequence, masked out: the outputs at the real positions do not move
    xp = torch.cat([x, torch.full((2, 12), 100)], 1)
    tp = torch.cat([types, torch.zeros(2, 12, dtype=torch.long)], 1)
    (mlm3, nsp3), _ = m(xp, token_type_ids=tp, attn_mask=xp != 100)
    torch.testing.assert_close(mlm3[:, :20], mlm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp3, nsp, atol=1e-5, rtol=1e-5)
    # rows of different lengths in one batch: each equals its own unpadded run
    xp[1, 14:] = 100
    (mlm4, _), _ = m(xp, token_type_ids=tp, attn_mask=xp != 100)
    (ref, _), _ = m(x[1:, :14], token_type_ids=types[1:, :14])
    torch.testing.assert_close(mlm4[1, :14], ref[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bidirectional"):
        M.Transformer(M.ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))(
            torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(1, 4, dtype=torch.bool))


def test_bert_heads_and_losses():
    m = bert_small()
    x = torch.randint(0, 97, (3, 16))
    t = torch.full_like(x, -1)
    t[:, 2], t[0, 9] = x[:, 2], x[0, 9]
    nsp_y = torch.tensor([0, 1, 1])
    (mlm, nsp), loss = m(x, t, labels=nsp_y)
    K = M.mlm_slots(16)  # the decoder only at K positions per row: the chosen ones first, in order
    assert mlm.shape == (3, K, 101) and nsp.shape == (3, 2)
    (full, _), _ = m(x)
    torch.testing.assert_close(mlm[0, :2], full[0, [2, 9]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlm[1:, 0], full[1:, 2], atol=1e-5, rtol=1e-5)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, ce(full[t != -1], x[t != -1]) + ce(nsp, nsp_y), atol=1e-5, rtol=1e-5)
    s = data.metrics_from_sums("mlm_nsp", data.metric_sums("mlm_nsp", (mlm, nsp), loss, {"idx": x, "targets": t, "labels": nsp_y}))
    assert s["loss"] == pytest.approx(loss.item(), abs=1e-5) and s["nsp_loss"] == pytest.approx(ce(nsp, nsp_y).item(), abs=1e-5)
    assert 0 <= s["mlm_acc"] <= 1 and s["nsp_acc"] in (0, 1 / 3, 2 / 3, 1)
    assert m.lm_head.weight is m.tok_emb.weight and m.lm_head.bias is not None  # tied decoder, own bias
    with pytest.raises(ValueError, match="generate"):
        m.generate(x, 1)
    c = bert_small(head="classify", n_labels=5)
    logits, loss = c(x, labels=torch.tensor([1, 4, -1]))
    assert logits.shape == (3, 5) and loss.item() > 0 and not hasattr(c, "nsp_head") and c.lm_head is None
    with pytest.raises(ValueError, match="causal=False"):
        M.ModelConfig(head="mlm_nsp")
    with pytest.raises(ValueError, match="n_labels"):
        M.ModelConfig(head="classify", causal=False)


@pytest.mark.parametrize("name,count", [("bert-base", 110_106_428), ("bert-large", 336_226_108)])
def test_bert_param_counts(name, count):
    with torch.device("meta"):
        m = M.Transformer(M.config_from_preset(name))
    assert m.num_params() == count  # Hugging Face BertForPreTraining, 30,522 vocabulary


def test_bert_init_rules():
    m = bert_small()
    assert torch.equal(m.norm.weight, torch.ones(32)) and torch.equal(m.mlm_norm.bias, torch.zeros(32))
    assert torch.equal(m.lm_head.bias, torch.zeros(101)) and torch.equal(m.pooler.bias, torch.zeros(32))
    for w in (m.type_emb.weight, m.pooler.weight, m.nsp_head.weight, m.blocks[1].mlp.down.weight):
        assert abs(w.std().item() - 0.02) < 0.006  # BERT: N(0, 0.02) everywhere, no residual scaling
    again = bert_small(seed=5)  # a pure function of the name and the seed, whatever the global RNG
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))


def test_logits_equal_huggingface_bert():
    transformers = pytest.importorskip("transformers", reason="transformers is optional; install it to compare with BertForPreTraining")
    cfg = dict(BERT_SMALL, ffn_hidden=64)
    m = bert_small(ffn_hidden=64)
    with torch.no_grad():  # large weights, non-trivial norms and biases: every mapping and the exact GELU matter
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if n.endswith("bias") or "norm" in n else 0.2))
    hf_cfg = transformers.BertConfig(vocab_size=cfg["vocab_size"], hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                     type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = transformers.BertForPreTraining(hf_cfg).eval()
    # hf.py's weight map; the decoder's weight and bias are tied to the word embeddings and cls.predictions.bias
    missing, unexpected = ref.load_state_dict(dict(hf.hf_tensors(m, "BertForPreTraining")), strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("cls.predictions.decoder.")], missing
    x = torch.randint(0, 97, (2, 24))
    x[1, 18:] = 100
    mask, types = x != 100, (torch.arange(24) >= 9).long().expand(2, 24)
    (mlm, nsp), _ = m(x, token_type_ids=types, attn_mask=mask)
    with torch.no_grad():
        out = ref(input_ids=x, token_type_ids=types, attention_mask=mask.long())
    torch.testing.assert_close(mlm[mask], out.prediction_logits[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, atol=1e-4, rtol=1e-4)


def test_adapt_heads_for_finetuning():
    pre = bert_small()
    cls = bert_small(seed=1, head="classify", n_labels=3)
    state = data.adapt_heads(pre.state_dict(), cls, seed=0)
    assert set(state) == set(cls.state_dict())  # MLM / NSP heads dropped, the new head from its init
    assert torch.equal(state["cls_head.weight"], cls.init_tensor("cls_head.weight", (3, 32), 0))
    assert torch.equal(state["pooler.weight"], pre.pooler.weight) and torch.equal(state["blocks.0.attn.q.weight"], pre.blocks[0].attn.q.weight)
    bad = dict(pre.state_dict(), **{"blocks.9.attn.q.weight": torch.zeros(1)})  # not a head: kept, for the strict check
    assert "blocks.9.attn.q.weight" in data.adapt_heads(bad, cls)


def test_stdlib_modules_demo_task(tmp_path):
    ex = prepare.stdlib_module_examples()
    labels = {lab for _, lab, _ in ex}
    files = prepare.pystdlib_files()
    tops = [rel.split("/")[0] for rel, _ in files if "/" in rel]
    assert labels == {p for p in tops if tops.count(p) >= 5} and {s for *_, s in ex} == {"train", "val"}  # packages of 5+ files
    assert all(0 < len(t.encode()) <= 126 for t, _, _ in ex) and sum(s == "val" for *_, s in ex) > 1500  # ~2,000 (Python 3.11: 2,102)
    val_text = "".join(Path(f).read_bytes().decode("utf-8", errors="ignore") for i, (_, f) in enumerate(files) if i % 20 == 0)
    assert all(t in val_text for t, _, s in ex if s == "val")  # split by file like pystdlib's 20th-document rule
    folder = prepare.prepare(prepare.CLASSIFY_DEMO, out_dir=tmp_path, quiet=True)
    meta = data.load_meta(folder)
    assert meta["labels"] == sorted(labels) and meta["val_docs"] == sum(s == "val" for *_, s in ex)
    c = data.encoder_corpus(folder, "val", meta, "classify")
    b = data.encoder_batch(c, 64, "classify", range(meta["val_docs"] - 2, meta["val_docs"] + 2))
    assert b["labels"][2:].tolist() == [-1, -1] and (b["labels"][:2] >= 0).all()  # past the end: ignored
    sp = data.special_ids(meta["vocab_size"])
    assert (b["idx"][:, 0] == sp.cls).all() and (b["idx"] == sp.sep).sum(1).tolist() == [1] * 4
    first = [t for t, _, s in ex if s == "val"][0]
    c0 = data.encoder_batch(c, 300, "classify", [0])
    n = len(first.encode())
    assert bytes(c0["idx"][0][1:1 + n].tolist()).decode() == first and c0["idx"][0][1 + n] == sp.sep
    with pytest.raises(ValueError, match="no labels"):
        data.encoder_corpus(folder, "val", {k: v for k, v in meta.items() if k != "labels"}, "classify")


def test_prepare_classify_jsonl(tmp_path):
    lines = [{"text": f"item {i}", "label": ["a", "b", 3][i % 3]} for i in range(45)]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--classify", "--name=x", f"--input={tmp_path / 'x.jsonl'}",
                        f"--out_dir={tmp_path}", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = data.load_meta(tmp_path / "x")
    assert meta["labels"] == ["3", "a", "b"] and (meta["train_docs"], meta["val_docs"]) == (42, 3)
    assert np.load(tmp_path / "x" / "val_labels.npy").tolist() == [1, 0, 2]  # lines 0, 20, 40: "a", 3, "b"
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"label": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare.prepare_classify("bad", [str(tmp_path / "bad.jsonl")], out_dir=tmp_path, quiet=True)


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
    assert (masks.sum(1) == noise).all() and abs(masks.mean() - 0.15) < 0.002 and not masks[:, 0].any()  # non-noise first
    lengths = np.concatenate([_runs(m) for m in masks])
    assert len(lengths) == 2000 * spans and lengths.mean() == pytest.approx(3.0, abs=0.05) and lengths.min() >= 1
    assert lengths.std() > 1.5 and (lengths == 1).mean() > 0.2  # T5's random segmentation, not fixed spans of 3
    assert masks[:, -1].all() and masks[:, 1:].any(0).all()  # runs alternate, the last one noise; spans anywhere
    c = data.t5_fit(data.t5_corpus(data_root / "pystdlib", "val", meta, "span"), "span", T)
    n = 64
    b = data.eval_batch(c, "span", T, range(n), n)
    assert b["idx"].shape == (n, T) and b["dec_idx"].shape == b["targets"].shape == (n, D) and b["attn_mask"].all()
    last = len(c["data"]) - raw
    for i in range(n):
        x, y = b["idx"][i], b["targets"][i]
        sentinel = lambda a: a[a >= base + data.N_SPECIAL] - base - data.N_SPECIAL
        assert sentinel(x).tolist() == sentinel(y).tolist() == list(range(spans))  # one per span, in increasing order
        assert x[-1] == y[-1] == meta["sep_id"] and b["dec_idx"][i].tolist() == [sp.pad] + y[:-1].tolist()
        start = i * last // (n - 1)  # the fixed validation windows are evenly spaced
        assert data.span_uncorrupt(x, y, base) == c["data"][start:start + raw].tolist()
    again = data.eval_batch(c, "span", T, range(n - 4, n), n)
    assert all(np.array_equal(again[k], b[k][n - 4:]) for k in b)
    train_c = data.t5_fit(data.t5_corpus(data_root / "pystdlib", "train", meta, "span"), "span", T)
    tb = data.train_batch(train_c, "span", T, range(0, 16), 16, 1, 7)  # a pure function of (seed, step, row)
    part = data.train_batch(train_c, "span", T, range(12, 16), 16, 1, 7)
    assert all(np.array_equal(part[k], tb[k][12:]) for k in tb)
    assert not np.array_equal(data.train_batch(train_c, "span", T, range(12, 16), 16, 1, 8)["idx"], part["idx"])


def test_span_lengths_are_t5s():
    assert data.span_lengths(512) == (568, 114)  # T5's inputs_length=512: 568 raw tokens, targets of 114
    for T in [*range(10, 200), *range(200, 1810, 37), 1809]:
        raw, D = data.span_lengths(T)
        x = np.arange(raw) % 1000  # (ids below the base vocabulary, 1000)
        inputs, targets = data.span_corrupt(x, data.noise_mask(raw, np.random.default_rng(T)), 1000, -5)
        assert (len(inputs), len(targets)) == (T, D), T
        assert data.span_uncorrupt(inputs, targets, 1000) == x.tolist()
        longer = data.span_corrupt(np.zeros(raw + 1, np.int64), data.noise_mask(raw + 1, np.random.default_rng(0)), 1000, -5)
        assert len(longer[0]) == T + 1  # the longest window that fits
    with pytest.raises(ValueError, match="seq_len=9 is too short"):
        data.span_lengths(9)
    with pytest.raises(ValueError, match="more than the 100 sentinels"):
        data.span_lengths(1810)


def test_seq2seq_prepare_roundtrip_and_batches(tmp_path):
    pairs = [(f"source {i}: " + "ü" * (i % 5), f"target {i}" + "!" * (i % 3)) for i in range(45)]
    pairs[20] = ("a long source, longer than seq_len", "a long target, cut too")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--seq2seq", "--name=p", f"--input={tmp_path / 'p.jsonl'}",
                        f"--out_dir={tmp_path}", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = data.load_meta(tmp_path / "p")
    assert meta["seq2seq"] is True and (meta["train_docs"], meta["val_docs"]) == (84, 6)  # two documents per example
    tok, sp, eos = prepare.get_tokenizer_from_meta(meta), data.special_ids(meta["vocab_size"]), meta["sep_id"]
    T, D = 24, 12
    c = data.t5_fit(data.t5_corpus(tmp_path / "p", "val", meta, "seq2seq"), "seq2seq", T, D)
    assert [tuple(tok.decode(a.tolist()) for a in data.seq2seq_example(c, k)) for k in range(3)] == [pairs[0], pairs[20], pairs[40]]
    train_c = data.t5_fit(data.t5_corpus(tmp_path / "p", "train", meta, "seq2seq"), "seq2seq", T)
    assert train_c["D"] == T and tok.decode(data.seq2seq_example(train_c, 41)[1].tolist()) == pairs[44][1]
    b = data.eval_batch(c, "seq2seq", T, range(4), 4)  # row 3: past the last example, example 0 again
    for row, (src, tgt) in enumerate([pairs[0], pairs[20], pairs[40], pairs[0]]):
        s, t = tok.encode(src)[:T - 1] + [eos], tok.encode(tgt)[:D - 1] + [eos]  # a long one is cut, its EOS kept
        assert b["idx"][row].tolist() == s + [sp.pad] * (T - len(s))
        assert b["attn_mask"][row].tolist() == [True] * len(s) + [False] * (T - len(s))
        assert b["targets"][row].tolist() == t + [-1] * (D - len(t))
        assert b["dec_idx"][row].tolist() == [sp.pad] + t[:-1] + [sp.pad] * (D - len(t))
    tb = data.train_batch(train_c, "seq2seq", T, range(8), 8, 0, 3)
    assert all(np.array_equal(tb[k][4:], data.train_batch(train_c, "seq2seq", T, range(4, 8), 8, 0, 3)[k]) for k in tb)
    with pytest.raises(ValueError, match="not a seq2seq corpus"):
        data.t5_corpus(tmp_path / "p", "val", {k: v for k, v in meta.items() if k != "seq2seq"}, "seq2seq")


def test_seq2seq_bad_jsonl_named_by_line(tmp_path):
    good = json.dumps({"source": "a", "target": "b"})
    for name, text, match in [("missing", f'{good}\n{{"source": "a"}}\n', "missing.jsonl:2: expected a JSON object with 'source' and 'target'"),
                              ("number", f'{good}\n\n{{"source": "a", "target": 3}}\n', "number.jsonl:3: expected"),
                              ("notjson", f"{good}\nsource, target\n", "notjson.jsonl:2: not a line of JSON")]:
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(ValueError, match=match):
            prepare.prepare_seq2seq(name, [str(tmp_path / f"{name}.jsonl")], out_dir=tmp_path, quiet=True)
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--seq2seq", "--name=x", f"--input={tmp_path / 'notjson.jsonl'}",
                        f"--out_dir={tmp_path}"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "notjson.jsonl:2" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="session")
def t5_demo(tmp_path_factory):
    """The built-in seq2seq demo task, prepared once (~8 s: every stdlib file is parsed)."""
    return Path(prepare.prepare(prepare.SEQ2SEQ_DEMO, out_dir=tmp_path_factory.mktemp("t5demo"), quiet=True))


def _pairs(folder, split):
    meta = data.load_meta(folder)
    tok, c = prepare.get_tokenizer_from_meta(meta), data.t5_corpus(folder, split, meta, "seq2seq")
    return [tuple(tok.decode(a.tolist()) for a in data.seq2seq_example(c, k)) for k in range(len(c["ends"]) // 2)]


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
    assert sum(t == common for _, t in ex["val"]) / len(ex["val"]) < 0.05  # the most common training target: a poor guess
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
    net = SimpleNamespace(cfg=SimpleNamespace(n_dec_layer=2, block_size=512), tok_emb=SimpleNamespace(weight=torch.zeros(1)),
                          generate=generate)
    ckpt = dict(config=dict(data_root=str(t5_demo.parent), dataset=t5_demo.name, seq_len=64, dec_len=0), meta=meta)
    r = sample.evaluate_exact_match(net, ckpt, "val", batch_size=50)
    assert r["n"] == len(val) and r["exact_match"] == (len(val) + 1) // 2 / len(val) and r["too_long"] == 0
    assert r["baselines"]["source"] == r["baselines"]["first line"] == 0.0
    assert [k for k in r["baselines"]][2].startswith("most common training target") and list(r["baselines"].values())[2] < 0.05
    assert len(calls) == -(-len(val) // 50) and calls[0][1:] == (64, sp.pad, eos, 0.0)


# training through train.py: learning, exact resume, fine-tuning, sampling

BERT_CFG = dict(objective="mlm_nsp", model="bert-tiny", n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=32,
                learning_rate=3e-3, min_lr=3e-4, warmup_iters=20, eval_iters=8)


@pytest.fixture(scope="session")
def bert_pretrained(data_root, tmp_path_factory):
    """A small BERT after 500 MLM+NSP steps on pystdlib (~20 s on one core), and its out_dir."""
    out = tmp_path_factory.mktemp("bert")
    return train.train(tiny_cfg(data_root, out, **BERT_CFG, max_iters=500, eval_interval=250)), out


def test_mlm_nsp_learns_on_pystdlib(data_root, bert_pretrained):
    s, out = bert_pretrained
    m = s["metrics"]  # the final evaluation: 8 x 32 fixed validation pairs
    meta = data.load_meta(data_root / "pystdlib")
    val = data.encoder_corpus(data_root / "pystdlib", "val", meta, "mlm_nsp")
    t = data.encoder_batch(val, 64, "mlm_nsp", range(8 * 32))["targets"]
    p = np.bincount(t[t != -1]) / (t != -1).sum()
    baseline, entropy = p.max(), -(p[p > 0] * np.log(p[p > 0])).sum()  # always a space (~35%); unigram (~3.1 nats)
    # measured: NSP 0.72; MLM 0.39 (~2,300 predictions, so +0.03 is 3 standard errors), loss 2.45
    assert m["nsp_acc"] > 0.6 and m["mlm_acc"] > baseline + 0.03 and m["mlm_loss"] < entropy - 0.4, (m, baseline, entropy)
    assert s["evals"][0][1] > 6.0 and s["evals"][-1][1] == pytest.approx(m["mlm_loss"] + m["nsp_loss"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {"mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"} <= set(log[-2]) and "val_nsp_acc" in log[-1]


def test_mlm_nsp_exact_resume(data_root, tmp_path):
    common = dict(BERT_CFG, batch_size=4, max_iters=8, eval_interval=4, lr_decay_iters=8, warmup_iters=4, dropout=0.1,
                  gradient_accumulation_steps=2, eval_iters=2)
    full = train.train(tiny_cfg(data_root, tmp_path / "a", **common))
    half = train.train(tiny_cfg(data_root, tmp_path / "b", **{**common, "max_iters": 4}))
    rest = train.train(tiny_cfg(data_root, tmp_path / "b", **common, init_from="resume"))
    assert half["train_losses"] + rest["train_losses"] == full["train_losses"]  # bit for bit
    a, b = full["model"].state_dict(), rest["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and full["metrics"] == rest["metrics"]


def test_finetune_classifier_from_pretrained(data_root, bert_pretrained, tmp_path):
    _, out = bert_pretrained
    ft = dict(objective="classify", dataset=prepare.CLASSIFY_DEMO, block_size=None, batch_size=32, max_iters=150,
              eval_interval=150, eval_iters=70, learning_rate=2e-3, warmup_iters=10)  # 70 x 32 rows: the whole val split
    s = train.train(tiny_cfg(data_root, tmp_path / "ft", init_from=str(out / "best.pt"), **ft))
    meta = data.load_meta(data_root / prepare.CLASSIFY_DEMO)
    labels = np.load(data_root / prepare.CLASSIFY_DEMO / "val_labels.npy")
    majority = np.bincount(labels).max() / len(labels)  # ~0.29; chance 1/19
    assert len(labels) <= 70 * 32 and s["metrics"]["acc"] > majority + 0.03, (s["metrics"], majority)  # measured 0.347
    net, pre = s["model"], checkpoint.load_checkpoint(out / "best.pt")
    assert net.cfg.head == "classify" and net.cfg.n_labels == len(meta["labels"]) and not hasattr(net, "nsp_head")
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path / "ft"))
    assert ck["model_args"]["head"] == "classify" and "mlm_dense.weight" not in ck["model"]
    # weights at step 0: the encoder and pooler are the checkpoint's, the new head is its fresh init
    s0 = train.train(tiny_cfg(data_root, tmp_path / "ft0", init_from=str(out / "best.pt"), **{**ft, "max_iters": 0}))
    assert torch.equal(s0["model"].blocks[1].mlp.up.weight, pre["model"]["blocks.1.mlp.up.weight"])
    assert torch.equal(s0["model"].pooler.weight, pre["model"]["pooler.weight"])
    assert torch.equal(s0["model"].cls_head.weight, s0["model"].init_tensor("cls_head.weight", (len(meta["labels"]), 64), 1337))
    # the same fine-tune from random initialisation runs too (the comparison the note reports)
    sc = train.train(tiny_cfg(data_root, tmp_path / "sc", model="bert-tiny", **{**ft, "max_iters": 10, "eval_interval": 10}))
    assert sc["model"].cfg.head == "classify" and 0 <= sc["metrics"]["acc"] <= 1
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={tmp_path / 'ft'}", "--start=import codecs"],
                       capture_output=True, text=True)
    lines = r.stdout.split("\n")
    assert r.returncode == 0 and lines[0].split()[1] in meta["labels"] and float(lines[0].split()[0]) > 0, r.stderr
    # a checkpoint whose encoder differs is still refused, by name
    with pytest.raises(ValueError, match="different architecture|n_layer"):
        train.train(tiny_cfg(data_root, tmp_path / "bad", init_from=str(out / "best.pt"), **{**ft, "n_layer": 3}))


def test_label_fraction_subsets(data_root, tmp_path):
    subsets = {(f, seed): data.label_subset(4030, f, seed) for f in (0.01, 0.1, 1.0) for seed in (1, 2)}
    assert [len(subsets[f, 1]) for f in (0.01, 0.1, 1.0)] == [41, 403, 4030]  # ceil(f * n)
    assert np.array_equal(subsets[1.0, 1], np.arange(4030))  # all, in order: the default draws as before
    for seed in (1, 2):  # nested: the 1% inside the 10%, the first ceil(f * n) of one permutation per seed
        assert set(subsets[0.01, seed]) < set(subsets[0.1, seed]) and len(set(subsets[0.1, seed])) == 403
    assert np.array_equal(data.label_subset(4030, 0.1, 1), subsets[0.1, 1]) and set(subsets[0.1, 1]) != set(subsets[0.1, 2])
    # training rows come from the subset only, the validation rows from all
    folder = data_root / prepare.CLASSIFY_DEMO
    if not (folder / "meta.json").exists():
        prepare.prepare(prepare.CLASSIFY_DEMO, out_dir=data_root, quiet=True)
    meta = data.load_meta(folder)
    c = data.encoder_corpus(folder, "train", meta, "classify")
    train_split, val_split = data.fit_splits((c, c), "classify", 64, 0, 0.001, 7)
    pick = data.label_subset(len(c["ends"]), 0.001, 7)
    assert np.array_equal(train_split["subset"], pick) and "subset" not in val_split
    rows = data.encoder_batch(train_split, 64, "classify", range(64), seed=7, step=3)["idx"]
    allowed = {data.classify_row(c, 64, int(i))["idx"].tobytes() for i in pick}
    assert {r.tobytes() for r in rows} <= allowed and len({r.tobytes() for r in rows}) > 1
    with pytest.raises(ValueError, match="label_fraction=0.5 picks labelled examples.*objective='clm'"):
        train.train(tiny_cfg(data_root, tmp_path, label_fraction=0.5))
    with pytest.raises(ValueError, match=r"label_fraction must be float in \(0, 1\]"):
        train.get_config(["--label_fraction=0"])


def test_finetune_grid_table(data_root, bert_pretrained, tmp_path, capsys):
    import finetune_grid
    _, out = bert_pretrained
    status = finetune_grid.main([f"--ckpt={out / 'best.pt'}", "--seeds=1", "--workers=2", f"--out_dir={tmp_path}",
                                 f"--json={tmp_path / 'grid.json'}", f"--data_root={data_root}", "--device=cpu", "--seq_len=64",
                                 "--batch_size=8", "--max_iters=3", "--warmup_iters=1", "--eval_iters=2", "--log_interval=100"])
    text = capsys.readouterr().out
    assert status == 0, text
    table = text[text.index("fine-tune grid:"):].splitlines()
    assert "every run: 3 steps of batch 8 x 64 tokens" in table[0] and table[1].split()[:3] == ["init", "labels", "steps"]
    n = data.load_meta(data_root / prepare.CLASSIFY_DEMO)["train_docs"]
    for row, (init, pct, k) in zip(table[2:8], [(i, p, k) for p, k in (("1%", -(-n // 100)), ("10%", -(-n // 10)), ("100%", n))
                                                for i in ("pretrained", "scratch")]):
        assert row.split()[:4] == [init, pct, f"({k:,})", "3"], row
    assert table[8].startswith("pretrained - scratch, points of mean accuracy: 1% ") and table[9].startswith("wall time:")
    rows = json.loads((tmp_path / "grid.json").read_text())["rows"]
    assert [(r["init"], r["fraction"], r["examples"]) for r in rows[:2]] == [("pretrained", 0.01, -(-n // 100)), ("scratch", 0.01, -(-n // 100))]
    assert all(r["min"] <= r["mean"] <= r["max"] and len(r["accs"]) == 1 for r in rows)
    assert finetune_grid.main(["--fractions=0"]) == 2 and "--fractions must be in (0, 1]" in capsys.readouterr().err


def test_objective_errors(data_root, tmp_path):
    with pytest.raises(ValueError, match="objective='mlm' is not allowed"):
        train.train(tiny_cfg(data_root, tmp_path, objective="mlm"))
    with pytest.raises(ValueError, match="head='mlm_nsp', objective='clm' needs 'lm'"):
        train.train(tiny_cfg(data_root, tmp_path, model="bert-tiny"))
    with pytest.raises(ValueError, match="no labels"):
        train.train(tiny_cfg(data_root, tmp_path, objective="classify"))
    with pytest.raises(ValueError, match="block_size"):
        train.train(tiny_cfg(data_root, tmp_path, **{**BERT_CFG, "seq_len": 128}))
    assert train.get_config(["--objective=mlm_nsp", "--seq_len=128"])["seq_len"] == 128


def test_sample_fills_masks(bert_pretrained):
    import re
    _, out = bert_pretrained
    start = "import os\nimport sys\n\ndef main(ar[MASK][MASK]):\n    return [MASK]\n"
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={out / 'best.pt'}", f"--start={start}",
                        "--temperature=0", "--num_samples=2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    samples = [t[:-1] for t in re.split(r"---------- sample \d+\n", r.stdout)[:2]]  # (print's newline)
    pattern = "(.)".join(re.escape(part) for part in start.split("[MASK]"))  # one byte per [MASK], the rest kept
    assert all(re.fullmatch(pattern, t, re.S) for t in samples) and samples[0] == samples[1], samples  # greedy
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={out / 'best.pt'}", "--start=no masks"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "[MASK]" in r.stderr and "Traceback" not in r.stderr


# the encoder-decoder through train.py and sample.py (these need model.py's T5: n_dec_layer > 0)

T5_CFG = dict(objective="span", model="t5-tiny", n_layer=2, n_embd=64, n_head=4, block_size=None, seq_len=64)


def t5_cfg(data_root, out, demo=None, **kw):
    """tiny_cfg for the small T5 above; with demo (the t5_demo folder), seq2seq on the demo task."""
    where = dict(objective="seq2seq", data_root=str(demo.parent), dataset=demo.name) if demo else {}
    return {**tiny_cfg(data_root, out, **{**T5_CFG, **kw}), **where}


def test_t5_objectives_need_an_encoder_decoder(data_root, tmp_path):
    with pytest.raises(ValueError, match="objective='span' needs an encoder-decoder model"):
        train.train(tiny_cfg(data_root, tmp_path, objective="span"))
    with pytest.raises(ValueError, match="trains with objective='span' or 'seq2seq', not 'clm'"):
        train.train(t5_cfg(data_root, tmp_path, objective="clm"))
    with pytest.raises(ValueError, match="dec_len=8 is the decoder's length, which objective='clm' has not"):
        train.train(tiny_cfg(data_root, tmp_path, dec_len=8))
    with pytest.raises(ValueError, match="dec_len=13 is shorter than the 14 target tokens of span corruption at seq_len=64"):
        train.train(t5_cfg(data_root, tmp_path, dec_len=13))
    with pytest.raises(ValueError, match="not a seq2seq corpus"):
        train.train(t5_cfg(data_root, tmp_path, objective="seq2seq"))
    cfg = train.check_config(t5_cfg(data_root, tmp_path))  # a T5 preset is accepted
    assert train.model_config(cfg, data.load_meta(data_root / "pystdlib")).vocab_size == 257 + 4 + 100


def test_t5_sample_every_logs_the_decoders_output(data_root, tmp_path):
    train.train(t5_cfg(data_root, tmp_path, max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=0, sample_every=2))
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    samples = [r["sample"] for r in recs if "sample" in r]
    # the source (its sentinels shown as <k>), then what the decoder wrote for it, greedily
    assert len(samples) == 1 and " -> " in samples[0] and "<0>" in samples[0].split(" -> ")[0], samples


@pytest.mark.parametrize("objective", ["span", "seq2seq"])
def test_t5_exact_resume(data_root, t5_demo, tmp_path, objective):
    common = dict(batch_size=4, max_iters=6, eval_interval=3, lr_decay_iters=6, warmup_iters=2, dropout=0.1,
                  gradient_accumulation_steps=2, eval_iters=2)
    demo = t5_demo if objective == "seq2seq" else None
    full = train.train(t5_cfg(data_root, tmp_path / "a", demo, **common))
    half = train.train(t5_cfg(data_root, tmp_path / "b", demo, **{**common, "max_iters": 3}))
    rest = train.train(t5_cfg(data_root, tmp_path / "b", demo, **common, init_from="resume"))
    assert half["train_losses"] + rest["train_losses"] == full["train_losses"]  # bit for bit
    a, b = full["model"].state_dict(), rest["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and full["metrics"] == rest["metrics"]


# distributed: the encoder-decoder under DDP and FSDP (every encoder and decoder block sharded), 2 ranks

T5_DIST = dict(batch_size=2, gradient_accumulation_steps=2, max_iters=4, eval_interval=2, eval_iters=2, warmup_iters=2,
               lr_decay_iters=6, threads=1)


def t5_dist_worker(data_root, out):
    modes_worker(lambda o, **kw: t5_cfg(data_root, o, **T5_DIST, **kw),
                 lambda s: {"losses": s["train_losses"], "evals": s["evals"],
                            "sharded": sum(type(b).__name__.startswith("FSDP") for b in [*s["model"].blocks, *s["model"].dec_blocks])},
                 out, "t5_dist.pt")


def test_t5_distributed_matches_single_process(data_root, tmp_path):
    one = train.train(t5_cfg(data_root, tmp_path / "single", **{**T5_DIST, "batch_size": 4}))  # same global batch
    run_ranks("dist_t5", data_root, tmp_path)
    res = torch.load(tmp_path / "t5_dist.pt", weights_only=True)
    assert res["fsdp"]["sharded"] == T5_CFG["n_layer"] + M.PRESETS["t5-tiny"]["n_dec_layer"] and res["ddp"]["sharded"] == 0
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(res[name]["losses"], one["train_losses"], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose([v for _, v in res[name]["evals"]], [v for _, v in one["evals"]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(res["fsdp_bf16_ac"]["losses"], one["train_losses"], atol=5e-2, rtol=0)


@pytest.fixture(scope="session")
def t5_seq2seq(data_root, t5_demo, tmp_path_factory):
    """A small T5 (2 + 4 blocks, 64 wide) after 300 steps on the demo task from scratch (~60 s on one core),
    and its out_dir."""
    out = tmp_path_factory.mktemp("t5")
    return train.train(t5_cfg(data_root, out, t5_demo, **T5_DEMO_RUN)), out


T5_DEMO_RUN = dict(batch_size=32, max_iters=300, eval_interval=150, eval_iters=7, warmup_iters=30, learning_rate=3e-3, min_lr=3e-4)


def test_t5_demo_task_beats_the_copy_baseline(t5_seq2seq):
    import sample
    s, out = t5_seq2seq
    assert s["evals"][-1][1] < s["evals"][0][1] - 2.0, s["evals"]
    net, ckpt = sample.load_model(str(out / "best.pt"))
    r = sample.evaluate_exact_match(net, ckpt, "val")
    assert r["exact_match"] > max(r["baselines"].values()) + 0.05, r  # measured: 16.7% (7.4% at step 150), baselines 0%
    res = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={out}", "--exact_match=val", "--device=cpu"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and f"{r['exact_match']:.1%} of {r['n']} examples" in res.stdout, res.stderr
    source = "def get(self, key, default=None):"
    res = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={out}", f"--source={source}", "--device=cpu"],
                         capture_output=True, text=True)
    tok = prepare.get_tokenizer_from_meta(ckpt["meta"])
    want = tok.decode(sample.generate_targets(net, ckpt["meta"], [tok.encode(source)], 64, 300, temperature=0.0)[0])
    assert res.returncode == 0 and res.stdout == f"{want}\n---------- sample 1\n", (res.stdout, res.stderr)  # greedy: one


def test_sample_source_needs_an_encoder_decoder(bert_pretrained):
    _, out = bert_pretrained
    for arg in ("--source=def f(a, b):", "--exact_match=val"):
        r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--ckpt={out / 'best.pt'}", arg], capture_output=True, text=True)
        assert r.returncode == 2 and "need an encoder-decoder checkpoint" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# distributed: DDP, FSDP (with bf16 and activation checkpointing) on the MLM+NSP objective, 2 ranks

BERT_DIST = dict(BERT_CFG, batch_size=4, gradient_accumulation_steps=2, max_iters=4, eval_interval=2, eval_iters=2,
                 warmup_iters=2, lr_decay_iters=6, threads=1)


def bert_dist_worker(data_root, out):
    modes_worker(lambda o, **kw: tiny_cfg(data_root, o, **BERT_DIST, **kw),
                 lambda s: {"losses": s["train_losses"], "metrics": s["metrics"]}, out, "bert_dist.pt")


def test_mlm_nsp_distributed_matches_single_process(data_root, tmp_path):
    one = train.train(tiny_cfg(data_root, tmp_path / "single", **{**BERT_DIST, "batch_size": 8}))  # same global batch
    run_ranks("dist_bert", data_root, tmp_path)
    res = torch.load(tmp_path / "bert_dist.pt", weights_only=True)
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(res[name]["losses"], one["train_losses"], atol=1e-5, rtol=0, err_msg=name)
        for k, v in one["metrics"].items():  # the same validation pairs, split across the ranks
            assert res[name]["metrics"][k] == pytest.approx(v, abs=1e-5), (name, k)
    np.testing.assert_allclose(res["fsdp_bf16_ac"]["losses"], one["train_losses"], atol=3e-2, rtol=0)


# ------------------------------------------------------------------------------------------------
# the GPU path: MFU peaks by device name, MLM without data-dependent shapes, compiled graphs

# (driver name, bf16, fp16, fp32 matmul peak) as torch.cuda.get_device_name reports it; None: not in the table
PEAK_CASES = [
    ("NVIDIA GB200", 2.5e15, 2.5e15, 1.25e15), ("NVIDIA B200", 2.25e15, 2.25e15, 1.125e15),
    ("NVIDIA H100 80GB HBM3", 989.4e12, 989.4e12, 494.7e12), ("NVIDIA H100 PCIe", 756e12, 756e12, 378e12),
    ("NVIDIA H100 NVL", 835.5e12, 835.5e12, 417.5e12), ("NVIDIA H200", 989.4e12, 989.4e12, 494.7e12),
    ("NVIDIA H200 NVL", 835.5e12, 835.5e12, 417.5e12), ("NVIDIA GH200 480GB", 989.4e12, 989.4e12, 494.7e12),
    ("NVIDIA H800", 989.4e12, 989.4e12, 494.7e12), ("NVIDIA H800 PCIe", 756e12, 756e12, 378e12),
    ("NVIDIA H20", 148e12, 148e12, 74e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 312e12, 156e12), ("NVIDIA A100-SXM4-40GB", 312e12, 312e12, 156e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 312e12, 156e12), ("NVIDIA A100 80GB PCIe", 312e12, 312e12, 156e12),
    ("NVIDIA A800-SXM4-80GB", 312e12, 312e12, 156e12), ("NVIDIA A40", 149.7e12, 149.7e12, 74.8e12),
    ("NVIDIA A30", 165e12, 165e12, 82e12), ("NVIDIA A10", 125e12, 125e12, 62.5e12),
    ("NVIDIA A10G", 125e12, 125e12, 62.5e12), ("NVIDIA RTX A6000", 154.8e12, 154.8e12, 77.4e12),
    ("NVIDIA GeForce RTX 3090", 71e12, 71e12, 35.6e12),
    ("NVIDIA L4", 121e12, 121e12, 60e12), ("NVIDIA L40", 181e12, 181e12, 90.5e12),
    ("NVIDIA L40S", 362e12, 362e12, 183e12), ("NVIDIA RTX 6000 Ada Generation", 364.2e12, 364.2e12, 182.1e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 165.2e12, 82.6e12),
    ("Tesla V100-SXM2-32GB", None, 125e12, 15.7e12), ("Tesla V100-SXM2-16GB", None, 125e12, 15.7e12),
    ("Tesla V100-PCIE-16GB", None, 112e12, 14e12), ("Tesla V100S-PCIE-32GB", None, 130e12, 16.4e12),
    ("Tesla T4", None, 65e12, 8.1e12),
    ("AMD Instinct MI300X", 1307.4e12, 1307.4e12, 163.4e12), ("AMD Instinct MI325X", 1307.4e12, 1307.4e12, 163.4e12),
    ("AMD Instinct MI250X/MI250", 383e12, 383e12, 95.7e12),
]


def test_peak_by_driver_name():
    keys = set()
    for name, *peaks in PEAK_CASES:
        for kind, peak in zip(("bf16", "fp16", "fp32"), peaks):
            found = common.peak_by_name(name, kind)
            assert (found and found[0]) == peak, (name, kind, found)
            if found:
                key, label = found[1].rsplit(" ", 3)[:2]  # "H100 PCIe tf32 dense spec"
                keys.add(key)
                assert label == (kind if kind != "fp32" else "tf32" if "tf32" in common.PEAK_FLOPS[key] else "fp32")
    assert keys == set(common.PEAK_FLOPS)  # every entry is reached by a real name
    for name in ("NVIDIA GeForce GTX 1080", "Quadro RTX 6000", "NVIDIA RTX A1000", "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
                 "NVIDIA L20", "Intel(R) Data Center GPU Max 1550"):  # unknown or a MIG slice: measured instead
        assert common.peak_by_name(name, "bf16") is None, name


def test_peak_flops_dtype_and_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert common.peak_flops("cuda", torch.float32) == (183e12, "L40S tf32 dense spec")  # TF32 assumed on
    assert common.peak_flops("cuda:0", torch.bfloat16) == (362e12, "L40S bf16 dense spec")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    assert common.peak_flops("cuda", torch.bfloat16, measure=False) == (None, "unknown")
    assert common.peak_flops("cpu", torch.float32, measure=False) == (None, "unknown")
    assert common.measure_matmul_flops("cpu", torch.float32, n=64, reps=1) > 0
    assert common.mfu(1e9, 1e3, 1e13) == pytest.approx(0.1) and common.mfu(1e9, 1e3, 1e13, world=4) == pytest.approx(0.025)
    assert common.mfu(1e9, 1e5, 1e13) == 1.0  # faster than a measured peak: clamped


def test_mlm_slots_cover_mask_tokens():
    """K = mlm_slots(T) is at least what data.mask_tokens chooses in the most real tokens a row of T holds."""
    rng = np.random.default_rng(0)
    for T in range(4, 1025):
        x = np.zeros(T, np.int64)
        chosen = (data.mask_tokens(x, np.arange(1, T - 2), rng, 100, 99) != -1).sum()  # T - 3 real tokens
        assert chosen <= M.mlm_slots(T) <= T, T


def test_mlm_gather_equals_boolean_indexing():
    """Losses and accuracies from the K gathered positions equal the former boolean-index computation."""
    F = torch.nn.functional
    m = bert_small()
    B, T = 4, 32
    K = M.mlm_slots(T)
    x = torch.randint(0, 97, (B, T))
    (full, _), _ = m(x)  # (B, T, V) at every position
    t = torch.full_like(x, -1)
    for row, n in enumerate((0, 1, K, 3)):  # a row with none chosen, one with all K slots used
        pos = torch.randperm(T)[:n]
        t[row, pos] = torch.where(torch.rand(n) < 0.5, full[row, pos].argmax(-1), x[row, pos])  # some correct
    labels = torch.tensor([0, 1, 1, 0])
    (mlm, nsp), loss = m(x, t, labels=labels)
    keep = t != -1
    mlm_loss, mlm_acc = F.cross_entropy(full[keep], t[keep]), (full[keep].argmax(-1) == t[keep]).float().mean()
    torch.testing.assert_close(loss, mlm_loss + F.cross_entropy(nsp, labels), atol=1e-5, rtol=1e-5)
    sums = data.metric_sums("mlm_nsp", (mlm, nsp), loss, {"idx": x, "targets": t, "labels": labels})
    assert sums[1] == sums[3] == keep.sum() and sums[5] == sums[7] == B
    got = data.metrics_from_sums("mlm_nsp", sums)
    assert got["mlm_loss"] == pytest.approx(mlm_loss.item(), abs=1e-5) and 0 < mlm_acc < 1
    assert got["mlm_acc"] == pytest.approx(mlm_acc.item())
    assert got["nsp_acc"] == pytest.approx((nsp.argmax(-1) == labels).float().mean().item())
    c = bert_small(head="classify", n_labels=5)  # classify, with an ignored label
    y = torch.tensor([1, -1, 3, 3])
    logits, loss = c(x, labels=y)
    got = data.metrics_from_sums("classify", data.metric_sums("classify", logits, loss, {"idx": x, "labels": y}))
    keep = y != -1
    assert got["loss"] == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), abs=1e-5)
    assert got["acc"] == pytest.approx((logits[keep].argmax(-1) == y[keep]).float().mean().item())


@pytest.mark.parametrize("head", ["mlm_nsp", "classify"])
def test_flops_per_token_matches_flop_counter_encoder_heads(head):
    """As test_flops_per_token_matches_flop_counter, for the encoder heads: the MLM head at mlm_slots(T)
    positions a row, pooler, NSP and classifier once a row (T a power of 2: the division is exact)."""
    cfg = M.ModelConfig(**{**BERT_SMALL, "block_size": 16, "head": head, "n_labels": 3 if head == "classify" else 0})
    m = M.Transformer(cfg)
    B, T = 2, 16
    x = torch.randint(97, (B, T))
    kw = dict(targets=torch.where(torch.rand(B, T) < 0.2, x, -1), labels=torch.tensor([0, 1])) if head == "mlm_nsp" \
        else dict(labels=torch.tensor([0, 2]))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            m(x, **kw)
        with FlopCounterMode(display=False) as both:
            m(x, **kw)[1].backward()
    assert fwd.get_total_flops() == M.flops_per_token(cfg, T, training=False) * B * T
    assert both.get_total_flops() == M.flops_per_token(cfg, T, training=True) * B * T


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_compile_lm_forward_and_loss_one_graph(style):
    torch._dynamo.reset()
    m = small_model(style).train()
    x = torch.randint(97, (2, 32))
    e = torch._dynamo.explain(m)(x, x)
    assert e.graph_count == 1 and e.graph_break_count == 0, e.break_reasons
    torch._dynamo.reset()


def test_compile_mlm_nsp_one_graph_for_any_mask_count():
    """Batches choosing different numbers of positions run the same compiled graph, forward and backward:
    no graph break (fullgraph), no recompile (one frame)."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    m = bert_small().train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    B, T = 3, 32
    for n in (1, 4, M.mlm_slots(T)):
        x = torch.randint(0, 97, (B, T))
        x[1, 20:] = 100  # padding in one row
        t = torch.full_like(x, -1)
        for row in range(B):
            pos = torch.randperm(20)[:max(1, n - row)]  # rows differ too
            t[row, pos] = x[row, pos]
        kw = dict(token_type_ids=(torch.arange(T) >= 10).long().expand(B, T), attn_mask=x != 100, labels=torch.tensor([0, 1, 0]))
        (mlm, nsp), loss = compiled(x, t, **kw)
        loss.backward()
        torch.testing.assert_close(loss, m(x, t, **kw)[1], atol=1e-5, rtol=1e-5)
        sums = data.metric_sums("mlm_nsp", (mlm, nsp), loss, dict(kw, idx=x, targets=t))
        assert sums[1] == (t != -1).sum()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_metric_sums_no_graph_break():
    torch._dynamo.reset()
    B, T, V = 3, 16, 11
    x, t = torch.randint(V, (B, T)), torch.where(torch.rand(B, T) < 0.3, torch.randint(V, (B, T)), -1)
    labels = torch.tensor([0, 1, -1])
    K = M.mlm_slots(T)
    for head, logits in (("lm", torch.randn(B, T, V)), ("classify", torch.randn(B, 4)),
                         ("mlm_nsp", (torch.randn(B, K, V), torch.randn(B, 2)))):
        e = torch._dynamo.explain(data.metric_sums)(head, logits, torch.tensor(2.0), dict(idx=x, targets=t, labels=labels))
        assert e.graph_count == 1 and e.graph_break_count == 0, (head, e.break_reasons)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# bench.py: FLOP count, memory estimator, JSON output (no timing assertions)

TINY_BENCH = ["--model=tiny", "--n_layer=1", "--batch_size=2", "--block_size=32", "--steps=2", "--warmup=1",
              "--synthetic", "--threads=1", "--device=cpu"]


def check_result(r):
    """The numbers of one variant are consistent with each other and with model.py."""
    assert {"model", "n_params", "model_config", "device", "dtype", "threads", "tokens_per_step", "ms_per_step",
            "tokens_per_s", "flops_per_token", "achieved_tflops", "peak_tflops", "peak_source", "mfu", "memory",
            "estimated_total_bytes", "speedup"} <= set(r)
    ms = r["ms_per_step"]
    assert len(ms["all"]) == r["steps"] and ms["min"] <= ms["p25"] <= ms["median"] <= ms["p75"] <= ms["max"]
    assert r["tokens_per_step"] == r["batch_size"] * r["block_size"] * r["gradient_accumulation_steps"]
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (ms["median"] / 1000))
    mcfg = M.ModelConfig(**r["model_config"])
    assert r["flops_per_token"] == M.flops_per_token(mcfg, r["block_size"], training=True)
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert r["mfu"] == pytest.approx(min(1.0, r["achieved_tflops"] / (r["peak_tflops"] * r["world"])))
    assert r["peak_tflops"] > 0 and r["peak_source"] and r["memory"]["peak_bytes"] > 0 and r["memory"]["source"]


def test_bench_cli_json_on_stdout():
    out = subprocess.run([sys.executable, "bench.py", *TINY_BENCH, "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)  # nothing but the JSON on stdout; the log went to stderr
    assert "ms/step" in out.stderr
    check_result(r)
    with torch.device("meta"):
        n = M.Transformer(M.ModelConfig(**r["model_config"])).num_params()
    assert (r["model"], r["n_params"], r["data"], r["threads"], r["device"]) == ("tiny", n, "synthetic", 1, "cpu")
    assert r["peak_source"] == "measured fp32 matmul" and r["speedup"] == 1.0
    assert r["memory"]["source"].startswith("peak RSS")


def test_bench_compare_json_file_and_profile(tmp_path, capsys):
    path, trace = tmp_path / "b.json", tmp_path / "trace.json"
    bench.main(TINY_BENCH + ["--compare", "n_layer=1,n_layer=2+batch_size=1", f"--json={path}", f"--profile={trace}",
                             "--peak_tflops=0.5"])
    torch.set_num_threads(1)
    assert "speedup" in capsys.readouterr().out  # with --json=PATH the log stays on stdout
    res = json.loads(path.read_text())["variants"]
    assert [v["name"] for v in res] == ["n_layer=1", "n_layer=2+batch_size=1"]
    assert [(v["model_config"]["n_layer"], v["batch_size"]) for v in res] == [(1, 2), (2, 1)]
    for v in res:
        check_result(v)
        assert (v["peak_tflops"], v["peak_source"]) == (0.5, "--peak_tflops")
    assert res[0]["speedup"] == 1.0 and res[1]["speedup"] > 0
    assert "traceEvents" in json.loads(trace.read_text())


def test_bench_steps_through_train(monkeypatch):
    calls, real = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = bench.main(TINY_BENCH)
    torch.set_num_threads(1)
    assert len(calls) == 1 + 2 and r["steps"] == 2  # warmup and timed steps are train.py's own step
    assert r["provenance"]["torch"] == torch.__version__


def test_bench_prepare_mode(gpt2, monkeypatch):
    """bench.py --prepare: prepare.py's tokens/s against a plain encode_ordinary loop, on the same documents."""
    monkeypatch.setattr(bench, "PREPARE_ROUNDS", 1)
    res = bench.main(["--prepare=1"])
    procs = min(os.cpu_count() or 1, 8)
    assert set(res["variants"]) == {"encode_ordinary loop", "prepare.py, 1 process", f"prepare.py, {procs} processes"}
    assert 1 <= res["mb"] < 1.1 and 1e5 < res["tokens"] < 1e6  # (every variant counted the same tokens)
    assert res["variants"]["encode_ordinary loop"]["speedup"] == 1.0

def test_bench_args():
    opts, rest = bench.parse_args(["--estimate", "llama-7b", "--gpus", "64", "--parallel", "fsdp", "--json"])
    assert (opts["estimate"], opts["gpus"], opts["json"]) == ("llama-7b", 64, True)
    cfg = train.get_config(rest)
    assert (cfg["model"], cfg["parallel"]) == ("llama-7b", "fsdp")
    opts, rest = bench.parse_args(["--synthetic", "--steps=5", "--batch_size", "4", "--compare=compile=False,compile=True"])
    assert (opts["synthetic"], opts["steps"], opts["compare"]) == (True, 5, "compile=False,compile=True")
    assert train.get_config(rest)["batch_size"] == 4
    with pytest.raises(ValueError, match="unknown config key"):
        bench.main(["--estimate", "--batch_sise=4"])


# ------------------------------------------------------------------------------------------------
# memory estimate

# small enough to count by hand: GPT-2 style, no biases (LayerNorm weights only), tied head
HAND = M.ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4, bias=False)
HAND_N = 10 * 4 + 8 * 4 + (4 + 4 * 4 + 4 * 8 + 4 * 4) + (4 + 4 * 16 + 16 * 4) + 4  # emb, pos, attn, mlp, final norm


def test_estimate_arithmetic():
    est = lambda world, parallel, **kw: bench.estimate_memory(
        HAND, **{**dict(batch_size=2, seq_len=8, world=world, parallel=parallel, dtype="float32",
                        activation_checkpointing="none"), **kw})
    fsdp, ddp = est(4, "fsdp"), est(4, "ddp")
    assert est(4, "fsdp", unsharded_grads=True)["grads"] == fsdp["grads"] + 4 * HAND_N  # fsdp_grad_sync='step'
    assert fsdp["n_params"] == ddp["n_params"] == HAND_N == 276
    assert (fsdp["params"], fsdp["grads"], fsdp["optimizer"]) == (4 * HAND_N / 4, 4 * HAND_N / 4, 8 * HAND_N / 4)
    assert (ddp["params"], ddp["grads"], ddp["optimizer"], ddp["buffers"]) == (4 * HAND_N, 4 * HAND_N, 8 * HAND_N, 0)
    # fp32, one layer, s*b*h = 64: LayerNorm inputs 2*4, attention input + q,kv,out 4*5, MLP in + GELU in/out
    # 4*(1 + 2*16/4); logsumexp 4*heads*s*b; head (the fused loss): norm in, LM-head in and its gradient
    # 12*s*b*h, the fp32 weight gradient 4*V*h, one chunk of all 16 rows: logits' gradient + product 4*V*(16 + h)
    layer = 64 * (8 + 4 * 5 + 4 * 9) + 4 * 16
    assert ddp["activations"] == fsdp["activations"] == layer + 64 * 12 + 4 * 10 * 4 + 4 * 10 * (16 + 4)
    for k in ("params", "grads", "optimizer"):  # doubling the GPUs halves the sharded terms only
        assert est(8, "fsdp")[k] == fsdp[k] / 2 and est(8, "ddp")[k] == ddp[k]
    assert est(8, "fsdp")["activations"] == fsdp["activations"]
    # the peak: all activations at the start of backward, or nearly all gradients and one block's at its end
    assert ddp["total"] == ddp["params"] + ddp["optimizer"] + ddp["buffers"] + max(ddp["activations"], ddp["grads"] + layer)


@pytest.mark.parametrize("preset", ["gpt2", "llama-7b"])
def test_estimate_checkpointing_and_dtype(preset):
    mcfg = M.config_from_preset(preset)
    est = lambda **kw: bench.estimate_memory(mcfg, **{**dict(batch_size=2, seq_len=mcfg.block_size, world=8,
                                                            parallel="fsdp", dtype="bfloat16", activation_checkpointing="none"), **kw})
    with torch.device("meta"):
        assert est()["n_params"] == M.Transformer(mcfg).num_params()
    assert est(activation_checkpointing="full")["activations"] < est()["activations"]
    assert est(activation_checkpointing="full")["total"] < est()["total"]
    assert est(dtype="float32")["activations"] > est()["activations"]
    acts = [est(batch_size=k)["activations"] for k in (2, 4, 6)]  # linear in the batch, past a fixed part
    assert acts[2] - acts[1] == pytest.approx(acts[1] - acts[0])   # (the fused loss's weight gradient, chunk)


@pytest.mark.parametrize("model_kw,dtype,ac", [
    (dict(model="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=257), "float32", "none"),
    (dict(model="tiny", n_layer=2), "float32", "none"),
    (dict(model="tiny", n_layer=2, n_kv_head=2), "bfloat16", "none"),
    (dict(model="tiny", n_layer=2), "float32", "full"),
])
def test_estimate_matches_cpu_allocator_peak(model_kw, dtype, ac):
    """The estimate against the CPU allocator's peak during one training step (the profiler's memory
    events), on top of the weights and optimizer state that exist before it."""
    argv = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in model_kw.items()]
    cfg = train.get_config(argv + ["--batch_size=4", "--block_size=64", f"--dtype={dtype!r}", "--threads=1",
                                   f"--activation_checkpointing={ac!r}", "--device='cpu'", "--compile=False"])
    v = bench.build_variant(cfg, dict(bench.OPTIONS, synthetic=True))
    bench.take_step(v)  # creates the optimizer state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.take_step(v)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"anvil_mem_{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    mem = [e["args"] for e in json.loads(path.read_text())["traceEvents"]
           if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    path.unlink()
    peak = max(m["Total Allocated"] for m in mem) - (mem[0]["Total Allocated"] - mem[0]["Bytes"])
    est = bench.estimate_memory(v["mcfg"], 4, 64, 1, "single", dtype, ac)
    assert est["total"] - est["params"] - est["optimizer"] == pytest.approx(peak, rel=0.1)


# ------------------------------------------------------------------------------------------------
# memory: the fused LM loss (no (B, T, V) logits in training), GQA without repeated K/V

def lm_step(m, x, y, dtype=None):
    """Training forward + backward: (logits, loss, {name: grad})."""
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits, loss = m(x, y)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("head", ["tied", "untied", "bias"])
def test_fused_lm_loss_equals_plain(head, monkeypatch):
    m = small_model("gpt2", tie_embeddings=head != "untied")
    if head == "bias":  # an LM head with a bias (only BERT's decoder has one today): its gradient too
        m.lm_head.bias = torch.nn.Parameter(0.1 * torch.randn(97))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(97, (2, 3, 20), generator=g)
    y[0, :6], y[2, 11] = -1, -1  # ignored targets
    monkeypatch.setattr(M, "LOSS_CHUNK_BYTES", 0)
    _, loss0, grads0 = lm_step(m, x, y)
    monkeypatch.setattr(M, "LOSS_CHUNK_BYTES", 4 * 97 * 7)  # chunks of 7 rows: 60 = 8 * 7 + 4
    logits, loss, grads = lm_step(m, x, y)
    assert logits is None and abs(loss.item() - loss0.item()) < 1e-6
    assert grads.keys() == grads0.keys()
    for name in grads:  # the tied weight gets the head's and the embedding's gradient
        torch.testing.assert_close(grads[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # evaluation takes the plain path: logits, and the same loss
        logits, loss = m(x, y)
    assert logits.shape == (3, 20, 97) and abs(loss.item() - loss0.item()) < 1e-6
    # under autocast the matmuls run in bf16 as nn.Linear's would; the loss is fp32 over the same logits
    monkeypatch.setattr(M, "LOSS_CHUNK_BYTES", 0)
    _, loss0, grads0 = lm_step(m, x, y, torch.bfloat16)
    monkeypatch.setattr(M, "LOSS_CHUNK_BYTES", 4 * 97 * 7)
    _, loss, grads = lm_step(m, x, y, torch.bfloat16)
    assert loss.dtype == torch.float32 and abs(loss.item() - loss0.item()) < 1e-5
    for name in grads:  # bf16 rounds the logits' gradient at a different scale: close, not equal
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], grads0[name], atol=2e-2 * grads0[name].abs().max().item(), rtol=0)


def cpu_peak_bytes(fn):
    """The CPU allocator's peak during fn(), above what was allocated before it (profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"anvil_peak_{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    mem = [e["args"] for e in json.loads(path.read_text())["traceEvents"]
           if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    path.unlink()
    return max(m["Total Allocated"] for m in mem) - (mem[0]["Total Allocated"] - mem[0]["Bytes"])


def test_fused_lm_loss_lowers_allocator_peak(monkeypatch):
    # a large vocabulary next to a narrow model: the loss dominates the step's memory
    m = small_model("gpt2", vocab_size=8192)
    x, y = torch.randint(8192, (2, 4, 32))
    step = lambda: m(x, y)[1].backward()
    step()  # gradients exist from here on: both measured steps accumulate into them
    monkeypatch.setattr(M, "LOSS_CHUNK_BYTES", 0)
    plain = cpu_peak_bytes(step)
    monkeypatch.undo()
    fused = cpu_peak_bytes(step)
    monkeypatch.setattr(M, "LOSS_CHUNK_BYTES", 4 * 8192 * 16)  # smaller chunks: lower still
    chunked = cpu_peak_bytes(step)
    # plain: the (128, 8192) fp32 logits, their log-softmax and gradients, 4 MiB each; fused: one chunk of
    # logits (here all 128 rows, then 16) and the head's fp32 weight gradient
    assert fused < 0.6 * plain and chunked < 0.6 * fused, (plain, fused, chunked)


@pytest.mark.skipif(not M.SDPA_GQA, reason="SDPA has no enable_gqa before torch 2.5")
def test_gqa_without_repeated_kv_equals_repeat_interleave(monkeypatch):
    att = M.Attention(M.ModelConfig(**SMALL["llama"]))  # 4 query heads, 2 K/V heads, RoPE
    rope = M.rope_cache(att.cfg)
    x = torch.randn(2, 10, 32)

    def run():
        saved, xg = {}, x.clone().requires_grad_()

        def pack(t):  # the bytes backward keeps, each storage once
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = att(xg, rope)
        att.zero_grad(set_to_none=True)
        y.square().sum().backward()
        return y.detach(), [xg.grad] + [p.grad for p in att.parameters()], sum(saved.values())

    y, grads, saved = run()
    monkeypatch.setattr(M, "SDPA_GQA", False)  # the repeat_interleave path (older torch, masks)
    y0, grads0, saved0 = run()
    torch.testing.assert_close(y, y0, atol=1e-6, rtol=1e-5)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
    assert saved < saved0  # backward keeps K and V at their own width, not repeated to all heads


# ------------------------------------------------------------------------------------------------
# encoder-decoder (T5): model, generation, parallel wrappers (Hugging Face parity: with the hf tests)

# 30-token sources exercise the log-spaced buckets (exact below 2 or 4, log up to 20, the last one beyond)
T5_SMALL = dict(M.PRESETS["t5-tiny"], vocab_size=97, block_size=32, n_layer=2, n_dec_layer=3, n_head=4, n_embd=32,
                ffn_hidden=48, relative_attention_num_buckets=8, relative_attention_max_distance=20)


def t5_small(seed=0, **kw):
    torch.manual_seed(seed)
    return M.Transformer(M.ModelConfig(**{**T5_SMALL, **kw})).eval()


def t5_batch(seed=0):
    """Sources (2, 30) whose row 1 is padding from position 19 on, its mask, and decoder inputs (2, 25)."""
    g = torch.Generator().manual_seed(seed)
    src, dec = torch.randint(0, 97, (2, 30), generator=g), torch.randint(0, 97, (2, 25), generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 19:] = False
    return src, mask, dec


@pytest.mark.parametrize("name,count", [("t5-small", 60_506_624), ("t5-base", 222_903_552)])
def test_t5_param_counts(name, count):
    with torch.device("meta"):
        m = M.Transformer(M.config_from_preset(name))
    assert m.num_params() == count  # T5ForConditionalGeneration's num_parameters(), tied embedding counted once


def test_t5_param_counts_equal_transformers():
    t = hf_libs()
    for name, kw in (("t5-small", {}), ("t5-base", dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12))):
        with torch.device("meta"):
            ours, theirs = M.Transformer(M.config_from_preset(name)), t.T5ForConditionalGeneration(t.T5Config(**kw))
        assert ours.num_params() == theirs.num_parameters(), name


def test_t5_config_errors():
    with pytest.raises(ValueError, match=r"an encoder-decoder \(n_dec_layer=2\) needs causal=False, got True"):
        M.ModelConfig(n_dec_layer=2)
    with pytest.raises(ValueError, match="needs head='lm', got 'classify'"):
        M.config_from_preset("t5-tiny", head="classify", n_labels=2)
    with pytest.raises(ValueError, match="needs pos='relative', got 'rope'"):
        M.config_from_preset("t5-tiny", pos="rope")
    m = t5_small()
    src, mask, dec = t5_batch()
    with pytest.raises(ValueError, match="needs dec_idx"):
        m(src)
    with pytest.raises(ValueError, match="decoder starts from start_id"):
        m.generate(src, 3)
    with pytest.raises(ValueError, match="target of 33 tokens exceeds block_size=32"):
        m(src, dec_idx=torch.zeros(2, 33, dtype=torch.long))


def test_t5_decoder_causal_encoder_bidirectional():
    m = t5_small()
    src, mask, dec = t5_batch()
    a = m(src, attn_mask=mask, dec_idx=dec)[0]
    d2 = dec.clone()
    d2[:, 15:] = (d2[:, 15:] + 1) % 97  # every decoder token from position 15 on
    b = m(src, attn_mask=mask, dec_idx=d2)[0]
    assert torch.equal(a[:, :15], b[:, :15]) and not torch.allclose(a[:, 15:], b[:, 15:])
    s2 = src.clone()
    s2[0, 17] = (s2[0, 17] + 1) % 97  # a late source token reaches the encoder's earlier positions
    assert not torch.allclose(m.encode(src, mask)[0, :17], m.encode(s2, mask)[0, :17])
    assert not torch.allclose(a[0], m(s2, attn_mask=mask, dec_idx=dec)[0][0])


def test_t5_encoder_ignores_padding():
    m = t5_small()
    src, mask, dec = t5_batch()
    a = m(src, attn_mask=mask, dec_idx=dec)[0]
    s2 = src.clone()
    s2[1, 19:] = (s2[1, 19:] + 7) % 97  # other contents at the padded positions
    assert torch.equal(a, m(s2, attn_mask=mask, dec_idx=dec)[0])
    alone = m(src[1:, :19], dec_idx=dec[1:])[0]  # row 1 unpadded, on its own
    torch.testing.assert_close(a[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, m(src, dec_idx=dec)[0])  # unmasked, the padding would be read


def test_t5_cached_generation_equals_recompute():
    m = t5_small()
    src, mask, _ = t5_batch()
    a = m.generate(src, 20, temperature=0, attn_mask=mask, start_id=96)
    b = m.generate(src, 20, temperature=0, attn_mask=mask, start_id=96, use_cache=False)
    assert a.shape == (2, 20) and torch.equal(a, b)
    # the cached logits themselves match the full forward pass, one token at a time
    dec = torch.cat([torch.full((2, 1), 96), a], 1)
    full = m(src, attn_mask=mask, dec_idx=dec)[0]
    cache, memory = m.new_cache(2, "cpu", torch.float32), m.encode(src, mask)
    steps = [m(None, cache=cache, pos=i, attn_mask=mask, dec_idx=dec[:, i:i + 1], memory=memory)[0] for i in range(21)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # stop_id: each row ends at its first stop, then repeats it; all stopped, generation ends
    stop = a[0, 3].item()
    c = m.generate(src, 20, temperature=0, attn_mask=mask, start_id=96, stop_id=stop)
    ends = [(a[r] == stop).nonzero()[0].item() + 1 if (a[r] == stop).any() else 20 for r in range(2)]
    assert c.size(1) == max(ends)
    for r in range(2):
        assert torch.equal(c[r, :ends[r]], a[r, :ends[r]]) and (c[r, ends[r]:] == stop).all()


def test_t5_activation_checkpointing_covers_decoder():
    cfg = dict(train.DEFAULTS, activation_checkpointing="full", compile=False)
    mcfg = M.ModelConfig(**T5_SMALL)
    plain = train.build_model(dict(cfg, activation_checkpointing="none"), mcfg, CPU)
    ac = train.build_model(cfg, mcfg, CPU)
    assert len(blocks_of(ac)) == 5 and all("forward" in vars(b) for b in blocks_of(ac))
    assert list(ac.state_dict()) == list(plain.state_dict())
    src, mask, dec = t5_batch()
    losses = []
    for m in (plain, ac):
        _, loss = m(src, attn_mask=mask, dec_idx=dec, targets=dec.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (n, p), q in zip(plain.named_parameters(), ac.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert plain.dec_rel_bias.weight.grad.abs().sum() > 0 and plain.blocks[0].attn.q.weight.grad.abs().sum() > 0


def test_t5_init_and_training_loss():
    m = t5_small()
    assert abs(m.tok_emb.weight.std().item() - 1.0) < 0.05  # T5's unit-variance embedding
    assert abs(m.dec_blocks[0].cross.q.weight.std().item() - (32 * 8) ** -0.5) < 0.01  # 1/sqrt(C * D)
    assert abs(m.blocks[0].mlp.down.weight.std().item() - 48 ** -0.5) < 0.02  # 1/sqrt(fan in)
    src, mask, dec = t5_batch()
    targets = dec.roll(-1, 1)
    targets[:, -3:] = -1
    m.train()
    _, fused = m(src, attn_mask=mask, dec_idx=dec, targets=targets)  # training: logits None, the fused loss
    with torch.no_grad():
        logits, plain = m(src, attn_mask=mask, dec_idx=dec, targets=targets)
    assert logits.shape == (2, 25, 97)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1))
    assert abs(plain.item() - np.log(97)) < 1.0  # near uniform at init, thanks to the output scaling


# ------------------------------------------------------------------------------------------------
# FLOPs

@pytest.mark.parametrize("kw", [dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32),
                                dict(M.PRESETS["llama-50m"], vocab_size=97, block_size=16, n_layer=2, n_head=4,
                                     n_kv_head=2, n_embd=32, multiple_of=16)])
def test_flops_per_token_matches_flop_counter(kw):
    """model.flops_per_token against torch's count of every matmul: the math SDPA backend runs the
    attention as two bmm (the CPU flash kernel has no FLOP formula), over the full T x T scores, which is
    what flops_per_token counts too. Backward does two matmuls per forward one: 3x."""
    cfg = M.ModelConfig(**kw)
    m = M.Transformer(cfg)
    B, T = 2, cfg.block_size
    x = torch.randint(cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():  # training's fused loss does all 3 in forward
            m(x, x)
        with FlopCounterMode(display=False) as both:
            m(x, x)[1].backward()
    assert fwd.get_total_flops() == M.flops_per_token(cfg, T, training=False) * B * T
    assert both.get_total_flops() == M.flops_per_token(cfg, T, training=True) * B * T


def test_flops_per_token_matches_flop_counter_encoder_decoder():
    """As above, for pairs of S source and T target tokens: a token is either kind."""
    cfg = M.ModelConfig(**T5_SMALL)
    m = M.Transformer(cfg)
    B, S, T = 2, 30, 25
    src, mask, dec = t5_batch()
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            m(src, attn_mask=mask, dec_idx=dec, targets=dec)
        with FlopCounterMode(display=False) as both:
            m(src, attn_mask=mask, dec_idx=dec, targets=dec)[1].backward()
    per_pair = B * (S + T)
    assert fwd.get_total_flops() == pytest.approx(M.flops_per_token(cfg, S, training=False, dec_len=T) * per_pair, rel=1e-12)
    assert both.get_total_flops() == pytest.approx(M.flops_per_token(cfg, S, training=True, dec_len=T) * per_pair, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# CUDA: these run where a GPU is (.ci/gpu runs them on one) and skip elsewhere

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run .ci/gpu on a GPU machine")
GPU = dict(device="cuda", threads=0, compile=False, n_layer=4, n_embd=128, block_size=128, batch_size=16)


@needs_cuda
def test_cuda_bf16_compiled_50_steps_learn(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path, **{**GPU, "compile": True}, dtype="bfloat16", max_iters=50, eval_interval=25))
    assert all(np.isfinite(s["train_losses"])) and s["bad_steps"] == 0
    (_, v0), _, (_, v50) = s["evals"]
    assert v50 < v0 - 2.0, s["evals"]  # from ln(257) = 5.55 to below a unigram byte model
    assert checkpoint.load_checkpoint(tmp_path / "best.pt")["provenance"]["device_name"] == torch.cuda.get_device_name()


@needs_cuda
def test_cuda_fp16_with_grad_scaler(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path, **GPU, dtype="float16", max_iters=40, eval_interval=20))
    assert s["evals"][-1][1] < s["evals"][0][1] - 1.5, s["evals"]
    scaler = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path))["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # the scaler ran and its state was saved


@needs_cuda
def test_cuda_fsdp_world_size_1_with_activation_checkpointing(data_root, tmp_path):
    kw = dict(GPU, dtype="float32", max_iters=8, eval_interval=4, log_interval=1)
    single = train.train(tiny_cfg(data_root, tmp_path / "single", **kw))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(REPO / "train.py")]
                       + [f"--{k}={v}" for k, v in tiny_cfg(data_root, tmp_path / "fsdp", **kw, parallel="fsdp",
                                                              activation_checkpointing="full").items() if v is not None],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "fsdp" / "log.jsonl")]
    losses = [rec["loss"] for rec in log if "loss" in rec]
    np.testing.assert_allclose(losses, np.round(single["train_losses"], 4), atol=2e-3)  # TF32 in both
    assert (tmp_path / "fsdp" / "ckpt-0000008.dcp").is_dir()


@needs_cuda
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_cuda_kv_cache_equals_recompute(style):
    m = small_model(style).cuda()
    prompt = torch.randint(0, 97, (2, 5), device="cuda")
    assert torch.equal(m.generate(prompt, 25, temperature=0, use_cache=True), m.generate(prompt, 25, temperature=0, use_cache=False))


@needs_cuda
def test_cuda_resume_within_a_run(data_root, tmp_path):
    kw = dict(GPU, dtype="bfloat16", max_iters=12, eval_interval=6, lr_decay_iters=12)
    full = train.train(tiny_cfg(data_root, tmp_path / "a", **kw))
    half = train.train(tiny_cfg(data_root, tmp_path / "b", **{**kw, "max_iters": 6}))
    rest = train.train(tiny_cfg(data_root, tmp_path / "b", **kw, init_from="resume"))
    assert len(half["train_losses"] + rest["train_losses"]) == 12 and rest["step"] == 12
    # GPU kernels need not be bit-reproducible (atomics in attention's backward): close, not equal
    np.testing.assert_allclose(half["train_losses"] + rest["train_losses"], full["train_losses"], atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Hugging Face: import (init_from='hf:DIR'), export (sample.py --export_hf), fine-tuning GPT-2

def hf_libs():
    pytest.importorskip("safetensors", reason="safetensors is optional: pip install safetensors")
    return pytest.importorskip("transformers", reason="transformers is optional: pip install transformers")


def perturb(net, scale=0.1):
    """Large random offsets on every weight, so that every norm, bias and permutation shows in the logits."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


def hf_reference(arch, seed=0):
    """A small random Hugging Face model: GPT-2, LLaMA with GQA (4 query heads, 2 key/value heads), BERT, or T5
    in T5_SMALL's shape: original (ReLU, tied and scaled) or v1.1 (gated GELU, unscaled; transformers 5 still
    ties its head)."""
    t = hf_libs()
    torch.manual_seed(seed)
    if arch == "gpt2":
        net = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    elif arch == "llama":
        net = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    elif arch.startswith("t5"):
        v11 = arch == "t5-v1.1"
        net = t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11))
        with torch.no_grad():  # unscaled, the unit-variance head gives logits ~sqrt(C): bring them to ~1, as trained
            net.lm_head.weight.mul_(0.25 if v11 else 1.0)
    else:
        net = t.BertForPreTraining(t.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=32))
    return perturb(net.eval())


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
        m = M.Transformer(M.ModelConfig(**ck["model_args"]))
    m.to_empty(device="cpu")
    m.init_buffers()
    checkpoint.restore(ck, m)  # checks every name and shape
    return m.eval(), ck


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5", "t5-v1.1"])
def test_hf_import_logits_equal(arch, tmp_path):
    ref = hf_reference(arch)
    ref.save_pretrained(tmp_path / "st")
    x = torch.randint(0, 97, (2, 24))
    m, ck = from_hf(tmp_path / "st")
    assert logit_gap(m, ref, x) < 1e-5
    if arch == "llama":
        assert (m.cfg.n_head, m.cfg.n_kv_head, m.cfg.tie_embeddings) == (4, 2, False)
    if arch.startswith("t5"):  # v1.1 is untied in anvil (its head a copy of the embedding), unscaled
        v11 = arch == "t5-v1.1"
        assert (m.cfg.n_dec_layer, m.cfg.mlp, m.cfg.tie_embeddings) == (3, "geglu" if v11 else "relu", not v11)
    # the older pytorch_model.bin format (read with weights_only=True) gives the same weights
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    again, _ = from_hf(tmp_path / "bin")
    assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-tied", "bert", "bert-classify", "t5", "t5-v1.1"])
def test_hf_export_loads_in_transformers(arch, tmp_path):
    t = hf_libs()
    # llama: GQA, untied; llama-tied: as the tiny preset; gpt2: tied; bert-classify: a fine-tuned classifier;
    # t5: tied, ReLU; t5-v1.1: untied (both written: transformers 5 then leaves them untied), gated GELU
    meta = {}
    if arch.startswith("bert"):
        m = perturb(bert_small(**(dict(head="classify", n_labels=3) if arch.endswith("classify") else {})))
    elif arch.startswith("t5"):
        m = perturb(t5_small(**(dict(mlp="geglu", tie_embeddings=False) if arch == "t5-v1.1" else {})))
        meta = dict(tokenizer="bytes", vocab_size=57)  # a corpus's 57 ids, then the 4 specials and sentinels
    else:
        m = perturb(small_model(arch.split("-")[0], tie_embeddings=arch.endswith("tied")))
    shard = 20_000 if arch == "llama" else 5 * 2**30  # llama: many shards and an index, as above 5 GB
    assert hf.export(m, dict(meta=meta), str(tmp_path), max_shard_bytes=shard) == hf.arch_of(m.cfg)
    assert (tmp_path / "model.safetensors.index.json").exists() == (arch == "llama")
    cls = {"bert": t.BertForPreTraining, "bert-classify": t.BertForSequenceClassification,
           "t5": t.T5ForConditionalGeneration, "t5-v1.1": t.T5ForConditionalGeneration}.get(arch, t.AutoModelForCausalLM)
    ref, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = torch.randint(0, m.cfg.vocab_size, (2, 24))
    assert logit_gap(m, ref.eval(), x) < 1e-5
    if meta:  # T5 starts the decoder from pad: anvil's [PAD], 57 + 3
        assert ref.config.decoder_start_token_id == ref.config.pad_token_id == 60
    back, _ = from_hf(tmp_path)  # anvil -> HF -> anvil: bit for bit
    a, b = m.state_dict(), back.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_import_bert_model_without_heads(tmp_path):
    t = hf_libs()
    torch.manual_seed(0)
    ref = perturb(t.BertModel(t.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=32)).eval())
    ref.save_pretrained(tmp_path)  # the encoder alone: no "bert." prefix, no MLM/NSP heads
    m, _ = from_hf(tmp_path)
    assert m.cfg.head == "mlm_nsp"  # its heads fresh, as for fine-tuning
    hidden = []
    m.blocks[-1].register_forward_hook(lambda mod, inp, out: hidden.append(out))
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        m(x)
        out = ref(input_ids=x)
    assert (hidden[0] - out.last_hidden_state).abs().max() < 1e-5


@pytest.mark.parametrize("style, change, match", [
    ("llama", dict(architectures=["MistralForCausalLM"], model_type="mistral"), "architecture 'MistralForCausalLM' is not supported"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "config.json sets rope_scaling="),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'default' only"),
    ("llama", dict(attention_bias=True), "config.json sets attention_bias=True, which anvil does not support"),
    ("llama", dict(sliding_window=16), "config.json sets sliding_window=16"),
    ("llama", dict(tie_word_embeddings=True), "tie_word_embeddings=true but lm_head.weight differs from the embedding"),
    ("t5", dict(d_kv=4), r"d_kv=4, which anvil does not support \(it must be d_model/num_heads=8\)"),
    ("t5", dict(feed_forward_proj="gated-relu"), "feed_forward_proj='gated-relu', which anvil does not support"),
])
def test_hf_import_refuses_what_anvil_cannot_represent(tmp_path, style, change, match):
    hf_reference(style).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(c, **change)))
    with pytest.raises(common.UserError, match=match) as e:
        hf.load_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value)


def test_hf_optional_packages_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(common.UserError, match="pip install safetensors"):
        hf.export(small_model("gpt2"), {}, str(tmp_path))


def test_hf_import_errors_are_one_line_from_the_cli(data_root, tmp_path, monkeypatch, capsys):
    ref = hf_reference("gpt2")
    ref.save_pretrained(tmp_path / "m")
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(c, tie_word_embeddings=False)))  # but no lm_head.weight
    capsys.readouterr()  # save_pretrained's progress bar
    status, err = main_fails([f"--init_from=hf:{tmp_path / 'm'}"], data_root, tmp_path, monkeypatch, capsys)
    assert status == 2 and err.count("\n") == 1 and "lacks weight 'lm_head.weight'" in err, err
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(c, architectures=["GPT2DoubleHeadsModel"])))
    status, err = main_fails([f"--init_from=hf:{tmp_path / 'm'}"], data_root, tmp_path, monkeypatch, capsys)
    assert status == 2 and err.count("\n") == 1 and "'GPT2DoubleHeadsModel' is not supported" in err, err


def test_hf_finetune_gpt2_resume_and_export(gpt2, tmp_path, capsys):
    t = hf_libs()
    torch.manual_seed(0)  # GPT-2's 50257-token vocabulary at a small width
    t.GPT2LMHeadModel(t.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "hf")
    prepare.prepare("j", [os.path.dirname(json.__file__)], tokenizer="gpt2", out_dir=tmp_path / "data", quiet=True)
    cfg = dict(train.DEFAULTS, data_root=str(tmp_path / "data"), dataset="j", init_from=f"hf:{tmp_path / 'hf'}",
               batch_size=8, max_iters=30, lr_decay_iters=30, eval_interval=15, eval_iters=2, warmup_iters=3,
               learning_rate=3e-3, log_interval=100, threads=1, device="cpu", dropout=0.1)
    full = train.train(dict(cfg, out_dir=str(tmp_path / "a")))
    (_, v0), _, (_, v30) = full["evals"]
    assert v0 > 10.0 and v30 < v0 - 1.0, full["evals"]  # ln(50257) = 10.8 at the start
    half = train.train(dict(cfg, out_dir=str(tmp_path / "b"), max_iters=15))
    rest = train.train(dict(cfg, out_dir=str(tmp_path / "b"), init_from="resume"))
    assert half["train_losses"] + rest["train_losses"] == full["train_losses"]  # bit for bit
    # the fine-tuned model back to transformers, with GPT-2's tokenizer files
    import sample
    assert sample.main([f"--ckpt={tmp_path / 'a'}", f"--export_hf={tmp_path / 'out'}", "--device=cpu"]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "out"))
    ref = t.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    x = torch.tensor([gpt2.encode("def loads(s, *, cls=None):\n    return")])
    assert logit_gap(full["model"].eval(), ref, x) < 1e-5


def test_hf_gpt2_tokenizer_files_match_tiktoken(gpt2, tmp_path):
    t = hf_libs()
    assert hf.write_gpt2_tokenizer(str(tmp_path), 1024)  # vocab.json and merges.txt rebuilt offline from tiktoken
    tok = t.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    folder = Path(os.__file__).parent
    text = "".join(p.read_text(encoding="utf-8") for p in sorted((folder / "email").glob("*.py")))[:300_000]
    text += "\n héllo ✓ wörld\t  日本語  \r\n\n  x"
    assert len(text) > 250_000 and tok(text)["input_ids"] == gpt2.encode(text)


# ------------------------------------------------------------------------------------------------
# faults: kills, preemption, NaNs, a full disk, a dead rank

FAULT = dict(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=8, warmup_iters=5, eval_iters=2,
             dropout=0.1, threads=1, log_interval=1, optimizer="adamw", lr_schedule="cosine", min_lr=3e-4)


def cli(cfg, data_root, out_dir):
    return [sys.executable, str(REPO / "train.py")] + [f"--{k}={v}" for k, v in
                                                       dict(FAULT, data_root=data_root, out_dir=out_dir, **cfg).items()]


def test_sigkill_anywhere_then_resume_is_bit_exact(data_root, tmp_path):
    import random
    import signal
    import time
    cfg = dict(max_iters=200, eval_interval=20, checkpoint_interval=1, keep_last=2, device="cpu")
    ref = train.train(tiny_cfg(data_root, tmp_path / "ref", **cfg, **FAULT))
    out, kills, rng = tmp_path / "killed", 0, random.Random(0)
    while kills < 10:
        init = "resume" if checkpoint.find_checkpoint(out) else "scratch"
        p = subprocess.Popen(cli(dict(cfg, init_from=init), data_root, out), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        for line in p.stdout:  # once training is under way (~20 steps/s, each writing a checkpoint) ...
            if line.startswith("step "):
                break
        time.sleep(rng.uniform(0.0, 0.8))  # ... kill it at a random moment
        if p.poll() is not None:
            assert p.returncode == 0, p.stderr.read()[-2000:]
            break  # finished before the kill came
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        last = checkpoint.find_checkpoint(out)
        if last:
            assert checkpoint.load_checkpoint(last)["step"] >= 1  # complete and readable after every kill
    assert kills >= 10
    r = subprocess.run(cli(dict(cfg, init_from="resume"), data_root, out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    final = checkpoint.load_checkpoint(checkpoint.find_checkpoint(out))
    assert final["step"] == 200
    expect = ref["model"].state_dict()
    assert all(torch.equal(final["model"][k], expect[k]) for k in expect)  # bit for bit
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-0000199.pt", "ckpt-0000200.pt"]  # keep_last=2
    assert "best.pt" in names and not [n for n in names if ".tmp" in n]


def test_sigterm_checkpoints_and_exits(data_root, tmp_path):
    import signal
    import time
    p = subprocess.Popen(cli(dict(max_iters=100000, eval_interval=100000, device="cpu"), data_root, tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait for training to be under way
        if line.startswith("step 3:"):
            break
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and time.time() - t0 < 10, err[-2000:]
    assert "signal received" in out
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path))
    assert 3 <= ck["step"] < 1000 and ck["config"]["max_iters"] == 100000


def nan_after(monkeypatch, first_bad_call):
    """Make the model's loss NaN from the first_bad_call-th forward pass in training on."""
    calls, forward = [0], getattr(M.Transformer.forward, "unpoisoned", M.Transformer.forward)

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training:
            calls[0] += 1
            if calls[0] >= first_bad_call:
                loss = loss * float("nan")
        return logits, loss
    poisoned.unpoisoned = forward
    monkeypatch.setattr(M.Transformer, "forward", poisoned)


def test_nonfinite_steps_are_skipped_then_stop(data_root, tmp_path, monkeypatch):
    common = dict(eval_interval=1000, lr_decay_iters=20, dropout=0.0)
    clean = train.train(tiny_cfg(data_root, tmp_path / "clean", max_iters=3, **common))
    nan_after(monkeypatch, 4)  # steps 1-3 fine, then every step NaN
    s = train.train(tiny_cfg(data_root, tmp_path / "nan", max_iters=8, max_bad_steps=10, **common))
    assert s["bad_steps"] == 5
    a, b = clean["model"].state_dict(), s["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the skipped updates were never applied
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path / "nan"))
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    nan_after(monkeypatch, 4)
    with pytest.raises(train.UserError, match=r"stopping at step 7: 4 non-finite steps in a row at lr .*last good "
                                           r"checkpoint is .*ckpt-0000006.pt"):
        train.train(tiny_cfg(data_root, tmp_path / "stop", max_iters=20, checkpoint_interval=3, max_bad_steps=4, **common))


def test_disk_full_keeps_previous_checkpoint(data_root, tmp_path, monkeypatch):
    saves, real_save = [0], torch.save

    def full_disk(obj, f):
        saves[0] += 1
        if saves[0] > 2:  # ckpt-5 and best are written, then the disk is full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, f)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint ckpt-0000010 .*No space left.*ckpt-0000005.pt is intact"):
        train.train(tiny_cfg(data_root, tmp_path, max_iters=20, eval_interval=5))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "ckpt-0000005.pt", "log.jsonl"]
    assert checkpoint.load_checkpoint(tmp_path / "ckpt-0000005.pt")["step"] == 5


def test_dead_rank_fails_fast(data_root, tmp_path):
    import time
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "test_model.py"), "dist", "die", str(data_root), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and time.time() - t0 < 120
    assert not (tmp_path / "phasedie.pt").exists()


def test_bad_checkpoints_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": {}, "x": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be read.*corrupted"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()  # the payload never ran
    checkpoint.save_file({"step": 1, "w": torch.ones(1000)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:700])
    with pytest.raises(ValueError, match="corrupted, truncated"):
        checkpoint.load_checkpoint(tmp_path / "cut.pt")


def bad_inputs(data_root, tmp):
    """(description, config overrides or a callable that damages a copy of the data, expected message)."""
    src = Path(data_root) / "pystdlib"

    def corpus(name, damage):
        d = tmp / "bad" / name
        d.mkdir(parents=True)
        for f in ("meta.json", "train.bin", "val.bin"):
            (d / f).write_bytes((src / f).read_bytes())
        damage(d)
        return dict(data_root=str(tmp / "bad"), dataset=name)

    meta = json.loads((src / "meta.json").read_text())

    def edit_meta(d, **kw):
        (d / "meta.json").write_text(json.dumps(dict(meta, **kw)))

    def big_id(d, record=True):  # as prepare.py would write it (record=True), or a corpus older than *_max_id
        a = np.fromfile(d / "val.bin", dtype=np.uint16)
        a[100] = 300
        a.tofile(d / "val.bin")
        edit_meta(d, val_max_id=300) if record else (d / "meta.json").write_text(
            json.dumps({k: v for k, v in meta.items() if not k.endswith("_max_id")}))
    return [
        ("missing data folder", dict(dataset="nope"), "python prepare.py"),
        ("empty .bin", corpus("empty", lambda d: ((d / "val.bin").write_bytes(b""), edit_meta(d, val_tokens=0))), "is empty"),
        ("truncated .bin", corpus("trunc", lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:999])), "truncated"),
        ("meta.json missing", corpus("nometa", lambda d: (d / "meta.json").unlink()), "meta.json not found"),
        ("meta.json inconsistent", corpus("dtype", lambda d: edit_meta(d, dtype="uint32")), "truncated or stale"),
        ("meta.json broken", corpus("broken", lambda d: (d / "meta.json").write_text("{not json")), "not valid meta.json"),
        ("token id >= vocab", corpus("bigid", big_id), "token id 300 >= the model's vocab_size=257"),
        ("token id >= vocab, old meta.json", corpus("oldmeta", lambda d: big_id(d, False)), "token id 300 >= the model's"),
        ("block larger than val", dict(block_size=10 ** 6), "validation split has"),
        ("vocab smaller than data", dict(vocab_size=100), "smaller than the dataset's vocabulary"),
        ("n_embd % n_head", dict(n_embd=66), "n_embd=66 is not divisible by n_head=4"),
        ("n_head % n_kv_head", dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
        ("unknown preset", dict(model="gpt3"), "model='gpt3' is not allowed: model must be str 'tiny' | 'gpt2'"),
        ("fp16 on CPU", dict(dtype="float16"), "float16' needs a GPU"),
        ("bad dtype", dict(dtype="fp8"), "dtype='fp8' is not allowed"),
        ("bad parallel", dict(parallel="tp"), "parallel='tp' is not allowed"),
        ("fsdp without torchrun", dict(parallel="fsdp"), "needs torchrun"),
        ("cuda without a GPU", dict(device="cuda"), "no CUDA device"),
        ("bad activation checkpointing", dict(activation_checkpointing="some"), "activation_checkpointing='some' is not allowed"),
        ("resume with nothing to resume", dict(init_from="resume"), "holds no checkpoint"),
        ("missing checkpoint", dict(init_from=str(tmp / "nope.pt")), "not found"),
    ]


def test_bad_inputs_rejected_before_compute(data_root, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(train, "build_model", lambda *a, **k: called.append(1))  # no compute may start
    cases = bad_inputs(data_root, tmp_path)
    for name, overrides, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            train.train({**tiny_cfg(data_root, tmp_path / "o"), **overrides})
        assert message in str(e.value), f"{name}: {e.value}"
    assert not called and len(cases) == 21
    cached = json.loads((tmp_path / "bad" / "oldmeta" / "meta.json").read_text())  # computed once, then cached
    assert (cached["val_max_id"], cached["train_max_id"]) == (300, 256)


WRONG_TYPE = {int: "x", float: "x", str: None, bool: "maybe"}  # a value of another type for each kind (str takes any text)


def bad_values(key):
    """Values that break `key`'s declared constraint: the rule's own examples and one of the wrong type."""
    kind, r = common.constraint(train.RULES[key])
    return (r.bad if r else []) + ([WRONG_TYPE[kind]] if WRONG_TYPE[kind] else [])


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


def test_every_key_has_a_constraint():
    assert set(train.RULES) == set(train.DEFAULTS)  # a new key must declare its rule beside its default
    for key in train.DEFAULTS:
        kind, r = common.constraint(train.RULES[key])
        assert kind in (int, float, str, bool) and (r is not None or kind is bool), key
        assert bad_values(key), key


def test_every_bad_value_is_one_line_before_any_work(data_root, tmp_path, monkeypatch, capsys):
    cases = [(key, v) for key in train.DEFAULTS for v in bad_values(key)]
    for key, value in cases:
        status, err = main_fails([f"--{key}={value}"], data_root, tmp_path, monkeypatch, capsys)
        assert status != 0 and err.count("\n") == 1 and "Traceback" not in err and f"{key}=" in err, (key, value, err)
    cross = [  # rules across keys, and what only setup or the model can tell
        (["--warmup_iters=50", "--max_iters=20"], "warmup_iters"), (["--warmup_iters=9", "--lr_decay_iters=8"], "warmup_iters"),
        (["--min_lr=0.1", "--learning_rate=0.01"], "min_lr"), (["--seq_len=64"], "seq_len"),
        (["--max_iters=0"], "max_iters=0"), (["--init_from=resume"], "init_from='resume'"),
        (["--model=bert-tiny"], "objective='clm'"), (["--n_embd=30", "--n_head=4"], "n_embd=30"),
        (["--n_kv_head=3", "--n_head=4"], "n_kv_head=3"), (["--dtype=float16"], "dtype='float16'"),
        (["--parallel=fsdp"], "parallel='fsdp'"), (["--device=cuda:3"], "device='cuda:3'"),
        (["--vocab_size=100"], "vocab_size=100"), (["--dataset=nothing"], "nothing"),
        (["--objective=classify"], "labels"), ([f"--init_from={tmp_path / 'no.pt'}"], "no.pt"),
        (["--max_iters"], "--max_iters"), (["--batch_sise=4"], "batch_sise"), ([str(tmp_path / "none.py")], "none.py"),
        (["--objective=span"], "objective='span' needs an encoder-decoder"), (["--dec_len=8"], "dec_len=8"),
        (["--optimizer=muon", "--parallel=fsdp"], "optimizer='muon' with parallel='fsdp'"),
        (["--label_fraction=0.5"], "label_fraction=0.5 picks labelled examples"),
    ]
    for argv, named in cross:
        status, err = main_fails(argv, data_root, tmp_path, monkeypatch, capsys)
        assert status != 0 and err.count("\n") == 1 and "Traceback" not in err and named in err, (argv, err)
    assert len(train.DEFAULTS) == 67 and len(cases) == 114 and len(cross) == 23  # keys and cases covered


def test_seq_len_past_a_checkpoints_block_size_is_one_line(data_root, tmp_path, capsys):
    train.train(tiny_cfg(data_root, tmp_path / "a", block_size=32, max_iters=2, eval_interval=2, warmup_iters=0))
    capsys.readouterr()
    status = train.main([f"--data_root={data_root}", f"--out_dir={tmp_path / 'b'}", "--device=cpu", "--threads=1",
                         f"--init_from={tmp_path / 'a' / 'best.pt'}", "--seq_len=64", "--max_iters=2", "--warmup_iters=0"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "seq_len=64 is longer than the model's block_size=32" in err, err
    assert not (tmp_path / "b").exists()


def test_cli_error_is_one_line_and_oom_is_named(data_root, tmp_path, monkeypatch, capsys):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--beta2=1.0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "beta2=1.0" in r.stderr and "[0.0, 1.0)" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing prepared, nothing written

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(train, "train_step", oom)
    status = train.main([f"--data_root={data_root}", f"--out_dir={tmp_path / 'o'}", "--device=cpu", "--threads=1",
                         "--n_layer=1", "--n_embd=32", "--block_size=32", "--max_iters=2", "--warmup_iters=0", "--eval_iters=1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "out of GPU memory at batch_size=8, seq_len=block_size" in err
    assert "activation_checkpointing='none'" in err and "Traceback" not in err


def test_out_dir_lock(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    with pytest.raises(common.UserError, match=f"in use by the run with pid {os.getppid()}"):
        train.train(tiny_cfg(data_root, out, max_iters=2, warmup_iters=0))
    assert sorted(p.name for p in out.iterdir()) == ["lock"]  # the live run's files are untouched
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "lock").write_text(f"{socket.gethostname()} {dead.stdout.strip()}")  # a killed run's lock: taken over
    s = train.train(tiny_cfg(data_root, out, max_iters=2, warmup_iters=0))
    assert s["step"] == 2 and not (out / "lock").exists()  # and released at the end
    with common.dir_lock(out):  # held by this process: a second run is refused while it lasts
        with pytest.raises(common.UserError, match="in use"):
            train.train(tiny_cfg(data_root, out, max_iters=2, warmup_iters=0))


def test_sigterm_during_evaluation_checkpoints_at_once(data_root, tmp_path, monkeypatch):
    import signal
    real, batches = data.eval_batch, []

    def slow_eval_batch(*a, **k):  # the signal arrives during the second evaluation, at its 3rd batch
        batches.append(1)
        if len(batches) == 64 + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(data, "eval_batch", slow_eval_batch)
    s = train.train(tiny_cfg(data_root, tmp_path, max_iters=20, eval_interval=5, eval_iters=64))
    assert s["preempted"] and s["step"] == 5 and len(batches) == 64 + 3  # no further batch, no further step
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path))
    assert ck["step"] == 5 and ck["last_eval"] == 0  # the interrupted evaluation is redone on resume
    rest = train.train(tiny_cfg(data_root, tmp_path, max_iters=20, eval_interval=5, eval_iters=64, init_from="resume"))
    assert rest["evals"][0][0] == 5 and rest["step"] == 20


def test_other_clis_check_every_argument_first(tmp_path, monkeypatch, capsys):
    import sample
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a: 1 / 0)  # nothing may be read before the checks
    cases = [(key, v) for key in sample.RULES for v in (common.constraint(sample.RULES[key])[1].bad
                                                        if common.constraint(sample.RULES[key])[1] else [])]
    cases += [(key, WRONG_TYPE[common.constraint(r)[0]]) for key, r in sample.RULES.items() if WRONG_TYPE[common.constraint(r)[0]]]
    cases += [("start", f"FILE:{tmp_path / 'missing.txt'}"), ("source", f"FILE:{tmp_path / 'missing.txt'}"),
              ("ckpt", str(tmp_path / "none.pt"))]
    assert {k for k, _ in cases} == set(sample.RULES)  # every argument of sample.py
    for key, value in cases:
        assert sample.main([f"--{key}={value}"]) == 2, (key, value)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err and "Traceback" not in err, (key, value, err)
    n_sample = len(cases)
    # bench.py: its own options (the rest are train.py's keys, checked as above)
    cases = [(key, v) for key, r in bench.RULES.items() for v in bad_values_of(r)]
    assert {k for k, _ in cases} == set(bench.RULES)  # every option of bench.py
    for key, value in cases + [("steps", None)]:
        with pytest.raises(common.UserError, match=key):
            bench.main([f"--{key}" if value is None else f"--{key}={value}", "--synthetic", "--device=cpu"])
    r = subprocess.run([sys.executable, str(REPO / "bench.py"), "--warmup=-1"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "warmup=-1" in r.stderr and "Traceback" not in r.stderr
    # prepare.py: every argument, one line each, nothing written
    out = tmp_path / "prep"
    bad = [["--name="], ["--name=a/b"], ["--input=nope*.txt", "--name=x"], ["--input=x.txt"], ["--tokenizer=nope"],
           ["--out_dir=", "--name=x"], ["--workers=0"], ["--workers=two"], ["--classify=1"], ["--quiet=no"], ["--nam=x"],
           ["--val_fraction=1.5"], ["--val_docs=0"], ["--text_field="], ["--hf_config=sample-10BT"], ["--hf_dataset=x"],
           ["--append"], ["--seq2seq=1"], ["--classify", "--seq2seq"]]
    for argv in bad:
        r = subprocess.run([sys.executable, str(REPO / "prepare.py"), f"--out_dir={out}", *argv], capture_output=True,
                           text=True, cwd=tmp_path)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert argv[0].split("=")[0].lstrip("-")[:3] in r.stderr and not out.exists(), (argv, r.stderr)
    assert (n_sample, len(cases) + 1, len(bad)) == (21, 16, 19)  # cases per CLI, for the closing note


def bad_values_of(annotation):
    kind, r = common.constraint(annotation)
    return (r.bad if r else []) + ([WRONG_TYPE[kind]] if WRONG_TYPE[kind] else [])


def test_finetune_architecture_mismatch_named(data_root, tmp_path):
    train.train(tiny_cfg(data_root, tmp_path / "pre", max_iters=5, eval_interval=5))
    with pytest.raises(ValueError, match="trained with n_layer=2 but the config sets n_layer=3"):
        train.train(tiny_cfg(data_root, tmp_path / "ft", n_layer=3, init_from=str(tmp_path / "pre" / "best.pt")))


if __name__ == "__main__" and sys.argv[1:2] == ["dist"]:
    dist_worker(*sys.argv[2:])
    torch.distributed.destroy_process_group()

if __name__ == "__main__" and sys.argv[1:2] == ["dist_bert"]:
    bert_dist_worker(*sys.argv[2:])
    torch.distributed.destroy_process_group()

if __name__ == "__main__" and sys.argv[1:2] == ["dist_t5"]:
    t5_dist_worker(*sys.argv[2:])
    torch.distributed.destroy_process_group()
