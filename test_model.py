"""
anvil's model tests: model.py alone (shapes, causality, parameter counts, attention and norms against PyTorch's,
GQA, the KV cache, sampling, initialisation, FLOPs, the fused LM loss, BERT's and T5's models, compiled graphs).
Run every test: python -m pytest -q (this file and tests/; see pyproject.toml).
Each test process uses one thread (torch.set_num_threads(1)) so that tests never fight over cores.
tests/ imports the small models below (small_model, bert_small, t5_small, ...) from this file.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import common
import data
import hf
import model as M
import parallelize
from parallelize import blocks_of
import train

torch.set_num_threads(1)


# a small GPT-2 style and a small LLaMA style (GQA) config, for quick checks of both paths; and a decoder-only
# model with T5's relative position bias, whose causal mask is in the bias
SMALL = {
    "gpt2": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32),
    "llama": dict(M.PRESETS["llama-50m"], vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                  n_embd=32, multiple_of=16),
    "relative": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="relative", norm="rmsnorm",
                     mlp="relu", bias=False, relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


CPU = parallelize.Runtime(torch.device("cpu"), torch.float32)  # one process, fp32, no compile


def small_model(style, seed=0, **kw):
    torch.manual_seed(seed)
    return M.from_config(M.ModelConfig(**{**SMALL[style], **kw})).eval()


BERT_SMALL = dict(M.PRESETS["bert-tiny"], vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)


def bert_small(seed=0, **kw):
    torch.manual_seed(seed)
    return M.from_config(M.ModelConfig(**{**BERT_SMALL, **kw})).eval()


# 30-token sources exercise the log-spaced buckets (exact below 2 or 4, log up to 20, the last one beyond)
T5_SMALL = dict(M.PRESETS["t5-tiny"], vocab_size=97, block_size=32, n_layer=2, n_dec_layer=3, n_head=4, n_embd=32,
                ffn_hidden=48, relative_attention_num_buckets=8, relative_attention_max_distance=20)


def t5_small(seed=0, **kw):
    torch.manual_seed(seed)
    return M.from_config(M.ModelConfig(**{**T5_SMALL, **kw})).eval()


def t5_batch(seed=0):
    """Sources (2, 30) whose row 1 is padding from position 19 on, its mask, and decoder inputs (2, 25)."""
    g = torch.Generator().manual_seed(seed)
    src, dec = torch.randint(0, 97, (2, 30), generator=g), torch.randint(0, 97, (2, 25), generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 19:] = False
    return src, mask, dec


# ------------------------------------------------------------------------------------------------
# decoder-only models: shapes, causality, sizes, attention, the KV cache, sampling, init

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
        m = M.from_config(M.config_from_preset(name))
    assert m.num_params() == count


def test_all_presets_build_on_meta():
    for name in M.PRESETS:
        with torch.device("meta"):
            m = M.from_config(M.config_from_preset(name))
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
    m = M.from_config(M.ModelConfig(**{**SMALL["gpt2"], "n_layer": 8}))
    std_proj = m.blocks[0].attn.proj.weight.std().item()
    assert abs(std_proj - 0.02 / 4) < 0.002 and abs(m.blocks[0].attn.q.weight.std().item() - 0.02) < 0.003
    m.init_weights(seed=1)
    assert not torch.equal(m.blocks[0].attn.q.weight, a.blocks[0].attn.q.weight[:m.blocks[0].attn.q.weight.shape[0]])


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
# encoder (BERT): bidirectional attention, padding, heads and losses, init, MLM slots

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
    with pytest.raises(TypeError, match="attn_mask"):  # the decoder-only model takes no padding mask
        M.from_config(M.ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))(
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
    mlm_nsp = data.OBJECTIVES["mlm_nsp"]
    s = data.metrics_from_sums(mlm_nsp, data.metric_sums(mlm_nsp, (mlm, nsp), loss,
                                                         {"idx": x, "targets": t, "labels": nsp_y}))
    assert (s["loss"] == pytest.approx(loss.item(), abs=1e-5)
            and s["nsp_loss"] == pytest.approx(ce(nsp, nsp_y).item(), abs=1e-5))
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
        m = M.from_config(M.config_from_preset(name))
    assert m.num_params() == count  # Hugging Face BertForPreTraining, 30,522 vocabulary


def test_bert_init_rules():
    m = bert_small()
    assert torch.equal(m.norm.weight, torch.ones(32)) and torch.equal(m.mlm_norm.bias, torch.zeros(32))
    assert torch.equal(m.lm_head.bias, torch.zeros(101)) and torch.equal(m.pooler.bias, torch.zeros(32))
    for w in (m.type_emb.weight, m.pooler.weight, m.nsp_head.weight, m.blocks[1].mlp.down.weight):
        assert abs(w.std().item() - 0.02) < 0.006  # BERT: N(0, 0.02) everywhere, no residual scaling
    again = bert_small(seed=5)  # a pure function of the name and the seed, whatever the global RNG
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))


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
    sums = data.metric_sums(data.OBJECTIVES["mlm_nsp"], (mlm, nsp), loss, {"idx": x, "targets": t, "labels": labels})
    assert sums[1] == sums[3] == keep.sum() and sums[5] == sums[7] == B
    got = data.metrics_from_sums(data.OBJECTIVES["mlm_nsp"], sums)
    assert got["mlm_loss"] == pytest.approx(mlm_loss.item(), abs=1e-5) and 0 < mlm_acc < 1
    assert got["mlm_acc"] == pytest.approx(mlm_acc.item())
    assert got["nsp_acc"] == pytest.approx((nsp.argmax(-1) == labels).float().mean().item())
    c = bert_small(head="classify", n_labels=5)  # classify, with an ignored label
    y = torch.tensor([1, -1, 3, 3])
    logits, loss = c(x, labels=y)
    classify = data.OBJECTIVES["classify"]
    got = data.metrics_from_sums(classify, data.metric_sums(classify, logits, loss, {"idx": x, "labels": y}))
    keep = y != -1
    assert got["loss"] == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), abs=1e-5)
    assert got["acc"] == pytest.approx((logits[keep].argmax(-1) == y[keep]).float().mean().item())


# ------------------------------------------------------------------------------------------------
# encoder-decoder (T5): model, generation, activation checkpointing (Hugging Face parity: tests/test_hf.py)

@pytest.mark.parametrize("name,count", [("t5-small", 60_506_624), ("t5-base", 222_903_552)])
def test_t5_param_counts(name, count):
    with torch.device("meta"):
        m = M.from_config(M.config_from_preset(name))
    assert m.num_params() == count  # T5ForConditionalGeneration's num_parameters(), tied embedding counted once


def test_t5_config_errors():
    with pytest.raises(ValueError, match=r"an encoder-decoder \(n_dec_layer=2\) needs causal=False, got True"):
        M.ModelConfig(n_dec_layer=2)
    with pytest.raises(ValueError, match="needs head='lm', got 'classify'"):
        M.config_from_preset("t5-tiny", head="classify", n_labels=2)
    with pytest.raises(ValueError, match="needs pos='relative', got 'rope'"):
        M.config_from_preset("t5-tiny", pos="rope")
    m = t5_small()
    src, mask, dec = t5_batch()
    with pytest.raises(TypeError, match="dec_idx"):
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
    encode = lambda x: m.hidden(m.embed(x), mask)  # noqa: E731
    assert not torch.allclose(encode(src)[0, :17], encode(s2)[0, :17])
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
    cache, memory = m.new_cache(2, "cpu", torch.float32, m.cfg.n_dec_layer), m.hidden(m.embed(src), mask)
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
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                                        ignore_index=-1))
    assert abs(plain.item() - np.log(97)) < 1.0  # near uniform at init, thanks to the output scaling


# ------------------------------------------------------------------------------------------------
# FLOPs per token: the 6N rule, and torch's FLOP counter

def test_flops_per_token_gpt2_matches_6n_rule():
    cfg = M.config_from_preset("gpt2")
    with torch.device("meta"):
        n = M.from_config(cfg).num_params(non_embedding=True)
    # 6 * (non-embedding params + tied head) + 12 * L * C * T: the PaLM / nanoGPT estimate, minus
    # the norms and biases, which do no matmul
    approx = 6 * (n + cfg.vocab_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert abs(common.flops_per_token(cfg) - approx) / approx < 1e-3


@pytest.mark.parametrize("kw", [dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32),
                                dict(M.PRESETS["llama-50m"], vocab_size=97, block_size=16, n_layer=2, n_head=4,
                                     n_kv_head=2, n_embd=32, multiple_of=16)])
def test_flops_per_token_matches_flop_counter(kw):
    """model.flops_per_token against torch's count of every matmul: the math SDPA backend runs the
    attention as two bmm (the CPU flash kernel has no FLOP formula), over the full T x T scores, which is
    what flops_per_token counts too. Backward does two matmuls per forward one: 3x."""
    cfg = M.ModelConfig(**kw)
    m = M.from_config(cfg)
    B, T = 2, cfg.block_size
    x = torch.randint(cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():  # training's fused loss does all 3 in forward
            m(x, x)
        with FlopCounterMode(display=False) as both:
            m(x, x)[1].backward()
    assert fwd.get_total_flops() == common.flops_per_token(cfg, T, training=False) * B * T
    assert both.get_total_flops() == common.flops_per_token(cfg, T, training=True) * B * T


@pytest.mark.parametrize("head", ["mlm_nsp", "classify"])
def test_flops_per_token_matches_flop_counter_encoder_heads(head):
    """As test_flops_per_token_matches_flop_counter, for the encoder heads: the MLM head at mlm_slots(T)
    positions a row, pooler, NSP and classifier once a row (T a power of 2: the division is exact)."""
    cfg = M.ModelConfig(**{**BERT_SMALL, "block_size": 16, "head": head, "n_labels": 3 if head == "classify" else 0})
    m = M.from_config(cfg)
    B, T = 2, 16
    x = torch.randint(97, (B, T))
    kw = dict(targets=torch.where(torch.rand(B, T) < 0.2, x, -1), labels=torch.tensor([0, 1])) if head == "mlm_nsp" \
        else dict(labels=torch.tensor([0, 2]))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            m(x, **kw)
        with FlopCounterMode(display=False) as both:
            m(x, **kw)[1].backward()
    assert fwd.get_total_flops() == common.flops_per_token(cfg, T, training=False) * B * T
    assert both.get_total_flops() == common.flops_per_token(cfg, T, training=True) * B * T


def test_flops_per_token_matches_flop_counter_encoder_decoder():
    """As above, for pairs of S source and T target tokens: a token is either kind."""
    cfg = M.ModelConfig(**T5_SMALL)
    m = M.from_config(cfg)
    B, S, T = 2, 30, 25
    src, mask, dec = t5_batch()
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            m(src, attn_mask=mask, dec_idx=dec, targets=dec)
        with FlopCounterMode(display=False) as both:
            m(src, attn_mask=mask, dec_idx=dec, targets=dec)[1].backward()
    per_pair = B * (S + T)
    assert fwd.get_total_flops() == pytest.approx(common.flops_per_token(cfg, S, training=False, dec_len=T) * per_pair,
                                                  rel=1e-12)
    assert both.get_total_flops() == pytest.approx(common.flops_per_token(cfg, S, training=True, dec_len=T) * per_pair,
                                                   rel=1e-12)


# ------------------------------------------------------------------------------------------------
# compiled graphs: one graph, no recompiles

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
        kw = dict(token_type_ids=(torch.arange(T) >= 10).long().expand(B, T), attn_mask=x != 100,
                  labels=torch.tensor([0, 1, 0]))
        (mlm, nsp), loss = compiled(x, t, **kw)
        loss.backward()
        torch.testing.assert_close(loss, m(x, t, **kw)[1], atol=1e-5, rtol=1e-5)
        sums = data.metric_sums(data.OBJECTIVES["mlm_nsp"], (mlm, nsp), loss, dict(kw, idx=x, targets=t))
        assert sums[1] == (t != -1).sum()
    assert counter.frame_count == 1
    torch._dynamo.reset()
