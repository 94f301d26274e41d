"""
Hugging Face: import (init_from='hf:DIR'), export (sample.py --export_hf), logits and parameter counts
against transformers, fine-tuning GPT-2, GPT-2's tokenizer files. Skipped without transformers and safetensors.
(An import under FSDP is in tests/test_distributed.py.)
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import common
import hf
import model as M
import prepare
import train

from conftest import _hf_tokenizer_file, from_hf, hf_libs, logit_gap, main_fails, perturb
from test_model import BERT_SMALL, bert_small, small_model, t5_small


def hf_reference(arch, seed=0):
    """A small random Hugging Face model: GPT-2, LLaMA with GQA (4 query heads, 2 key/value heads), BERT, or T5
    in T5_SMALL's shape: original (ReLU, tied and scaled) or v1.1 (gated GELU, unscaled; transformers 5 still
    ties its head)."""
    t = hf_libs()
    torch.manual_seed(seed)
    if arch == "gpt2":
        net = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    elif arch == "llama":
        net = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=32))
    elif arch.startswith("t5"):
        v11 = arch == "t5-v1.1"
        net = t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11))
        with torch.no_grad():  # unscaled, the unit-variance head gives logits ~sqrt(C): bring them to ~1, as trained
            net.lm_head.weight.mul_(0.25 if v11 else 1.0)
    else:
        net = t.BertForPreTraining(t.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=32))
    return perturb(net.eval())


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
           "t5": t.T5ForConditionalGeneration,
           "t5-v1.1": t.T5ForConditionalGeneration}.get(arch, t.AutoModelForCausalLM)
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
    ("llama", dict(architectures=["MistralForCausalLM"], model_type="mistral"),
     "architecture 'MistralForCausalLM' is not supported"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "config.json sets rope_scaling="),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_type 'default' only"),
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


@pytest.mark.slow
def test_hf_finetune_gpt2_resume_and_export(gpt2, tmp_path, capsys):
    t = hf_libs()
    torch.manual_seed(0)  # GPT-2's 50257-token vocabulary at a small width
    t.GPT2LMHeadModel(t.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "hf")
    prepare.prepare("j", [os.path.dirname(json.__file__)], tokenizer="gpt2", out_dir=tmp_path / "data", quiet=True)
    cfg = dict(train.DEFAULTS, data_root=str(tmp_path / "data"), dataset="j", init_from=f"hf:{tmp_path / 'hf'}",
               batch_size=8, max_iters=30, lr_decay_iters=30, eval_interval=15, eval_iters=2, warmup_iters=3,
               learning_rate=3e-3, log_interval=100, threads=1, device="cpu", dropout=0.1)
    full = train.train(dict(cfg, out_dir=str(tmp_path / "a")))
    assert (full["config"]["model"], full["config"]["optimizer"]) == (f"hf:{tmp_path / 'hf'}", "adamw")  # as ran
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


def test_hf_export_carries_the_tokenizer_json(tmp_path):
    """A model trained on a tokenizer.json corpus exports with that tokenizer, as transformers and lm-eval need it."""
    pytest.importorskip("safetensors", reason="safetensors is optional: pip install safetensors")
    _, path = _hf_tokenizer_file(tmp_path / "tok")
    hf.export(small_model("llama"), {"meta": {"tokenizer": str(path)}}, str(tmp_path / "out"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()


def test_logits_equal_huggingface_bert():
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is optional; install it to compare with BertForPreTraining")
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


def test_t5_param_counts_equal_transformers():
    t = hf_libs()
    for name, kw in (("t5-small", {}), ("t5-base", dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12))):
        with torch.device("meta"):
            ours, theirs = M.from_config(M.config_from_preset(name)), t.T5ForConditionalGeneration(t.T5Config(**kw))
        assert ours.num_params() == theirs.num_parameters(), name
