"""
Hugging Face interop: anvil models to and from transformers' GPT2LMHeadModel, LlamaForCausalLM,
BertForPreTraining (also BertModel, BertForSequenceClassification) and T5ForConditionalGeneration folders
of config.json plus safetensors.

    python train.py --init_from=hf:path/to/folder --dataset=mycode   # fine-tune; hf:NAME downloads from the hub
    python sample.py --ckpt=out --export_hf=out-hf                   # a folder from_pretrained() loads

The weight map is a list of groups, each relating anvil tensors to Hugging Face tensors: the anvil ones,
concatenated along dim 0, equal the Hugging Face ones, each first transformed, concatenated along dim 0.
The transforms: GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear's; LLaMA orders
each head's rotary channels in two halves (rotate_half pairs channel j with j + D/2), anvil interleaves
them (apply_rope pairs 2j with 2j+1, at the same frequency), so q/k rows are permuted. Both are exact,
so anvil -> HF -> anvil is bit for bit. transformers, safetensors and huggingface_hub are optional:
imported here, inside the functions that need them.
"""
import json
import os
import shutil
from dataclasses import asdict

import torch

import model as M
from common import UserError, atomic_write, need
from parallelize import dim0_shard

ARCHS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "BertForPreTraining": "bert", "BertModel": "bert",
         "BertForSequenceClassification": "bert", "T5ForConditionalGeneration": "t5"}
# config.json fields anvil cannot honour, with the one value it can (absent counts as that value)
FIXED = {"gpt2": dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
         "llama": dict(hidden_act="silu", attention_bias=False, mlp_bias=False, rope_scaling=None),
         "bert": dict(position_embedding_type="absolute", is_decoder=False, add_cross_attention=False),
         "t5": dict(is_encoder_decoder=True)}
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF activation -> anvil gelu_approx
T5_MLP = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}  # T5's feed_forward_proj -> anvil mlp
# tensors a Hugging Face file may hold that are derived (causal masks, rotary tables, tied copies), not weights
DERIVED = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq", "cls.predictions.decoder.bias",
           "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",  # T5: copies of shared.weight
           "EncDecAttention.relative_attention_bias.weight")  # in some T5 files, unused


# -----------------------------------------------------------------------------------------------
# configs: config.json <-> ModelConfig

def from_hf_config(c):
    """(architecture, ModelConfig) of a config.json dict; a UserError names what anvil cannot represent."""
    arch = (c.get("architectures") or [None])[0]
    if arch not in ARCHS:
        raise UserError(f"architecture {arch or c.get('model_type')!r} is not supported; anvil imports "
                        f"{', '.join(ARCHS)}")
    kind = ARCHS[arch]
    for key, ok in dict(FIXED[kind], sliding_window=None).items():
        if c.get(key, ok) != ok:
            raise UserError(f"config.json sets {key}={c[key]!r}, which anvil does not support ({arch} needs "
                            f"{key}={ok!r})")
    act = c.get("activation_function" if kind == "gpt2" else "hidden_act", "gelu_new" if kind == "gpt2" else "silu")
    if kind in ("gpt2", "bert") and act not in GELU:
        raise UserError(f"config.json sets activation {act!r}, which anvil does not support (one of {sorted(GELU)})")
    if kind == "gpt2":
        C = c["n_embd"]
        args = dict(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
                    n_embd=C, ffn_hidden=c.get("n_inner") or 4 * C, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                    gelu_approx=GELU[act], tie_embeddings=c.get("tie_word_embeddings", True))
    elif kind == "llama":
        rope = c.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
        if rope.get("rope_type", "default") != "default":
            raise UserError(f"config.json sets rope_parameters={rope}, which anvil does not support (rope_type "
                            f"'default' only)")
        C, H = c["hidden_size"], c["num_attention_heads"]
        if c.get("head_dim") not in (None, C // H):
            raise UserError(f"config.json sets head_dim={c['head_dim']}, which anvil does not support (it must be "
                            f"hidden_size/num_attention_heads={C // H})")
        args = dict(M.PRESETS["llama-50m"], vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
                    n_layer=c["num_hidden_layers"], n_head=H, n_kv_head=c.get("num_key_value_heads") or H, n_embd=C,
                    ffn_hidden=c["intermediate_size"],
                    rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
                    norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False))
    elif kind == "t5":
        C, H, ff = c["d_model"], c["num_heads"], c.get("feed_forward_proj", "relu")
        if c.get("d_kv", C // H) != C // H:
            raise UserError(f"config.json sets d_kv={c['d_kv']}, which anvil does not support (it must be "
                            f"d_model/num_heads={C // H})")
        if ff not in T5_MLP:
            raise UserError(f"config.json sets feed_forward_proj={ff!r}, which anvil does not support (one of "
                            f"{sorted(T5_MLP)})")
        # transformers 5 keeps tie_word_embeddings true and says whether to scale in scale_decoder_outputs: anvil
        # ties exactly when it scales (T5 v1.1 neither), and takes an unscaled model's head as its own copy
        args = dict(M.PRESETS["t5-small"], vocab_size=c["vocab_size"], block_size=c.get("n_positions") or 512,
                    n_layer=c["num_layers"], n_dec_layer=c.get("num_decoder_layers") or c["num_layers"], n_head=H,
                    n_embd=C, ffn_hidden=c["d_ff"], mlp=T5_MLP[ff], norm_eps=c.get("layer_norm_epsilon", 1e-6),
                    relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
                    tie_embeddings=c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True)))
    else:
        classify = arch == "BertForSequenceClassification"
        args = dict(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
                    n_head=c["num_attention_heads"], n_embd=c["hidden_size"], ffn_hidden=c["intermediate_size"],
                    causal=False, post_norm=True, gelu_approx=GELU[act], norm_eps=c.get("layer_norm_eps", 1e-12),
                    type_vocab_size=c.get("type_vocab_size", 2), tie_embeddings=c.get("tie_word_embeddings", True),
                    head="classify" if classify else "mlm_nsp",
                    n_labels=len(c.get("id2label") or {}) or c.get("num_labels", 2) if classify else 0)
    try:
        return arch, M.ModelConfig(**args)
    except ValueError as e:
        raise UserError(f"config.json: {e}") from None


def arch_of(cfg):
    """The Hugging Face architecture an anvil ModelConfig is, or a UserError naming why none is."""
    if cfg.qk_norm:
        raise UserError("this model has qk_norm=True, which none of GPT-2, LLaMA, BERT or T5 has: Hugging Face "
                        "export does not support it")
    lm = cfg.causal and not cfg.post_norm and not cfg.type_vocab_size and cfg.head == "lm"
    shape = (cfg.norm, cfg.mlp, cfg.pos, cfg.bias, cfg.n_kv_head)
    if lm and shape == ("layernorm", "gelu", "learned", True, cfg.n_head):
        return "GPT2LMHeadModel"
    if lm and (cfg.norm, cfg.mlp, cfg.pos, cfg.bias) == ("rmsnorm", "swiglu", "rope", False):
        return "LlamaForCausalLM"
    if (not cfg.causal and cfg.post_norm and cfg.type_vocab_size and cfg.head != "lm" and cfg.bias
            and (cfg.norm, cfg.mlp, cfg.pos, cfg.n_kv_head) == ("layernorm", "gelu", "learned", cfg.n_head)):
        return "BertForPreTraining" if cfg.head == "mlm_nsp" else "BertForSequenceClassification"
    if (cfg.n_dec_layer and (cfg.norm, cfg.bias, cfg.n_kv_head) == ("rmsnorm", False, cfg.n_head)
            and cfg.mlp in T5_MLP.values() and (cfg.mlp != "geglu" or cfg.gelu_approx == "tanh")):
        return "T5ForConditionalGeneration"
    raise UserError(f"this model (norm={cfg.norm}, mlp={cfg.mlp}, pos={cfg.pos}, bias={cfg.bias}, causal={cfg.causal}, "
                    f"head={cfg.head}, n_dec_layer={cfg.n_dec_layer}) is none of GPT-2, LLaMA, BERT or T5, the shapes "
                    f"Hugging Face export supports")


def to_hf_config(cfg, arch, labels=None, start_id=None):
    """config.json for an anvil ModelConfig of architecture `arch` (see arch_of). start_id: T5's decoder
    start (and pad) id, if not T5's own 0."""
    d = cfg.dropout
    if arch == "GPT2LMHeadModel":
        c = dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ffn_hidden, layer_norm_epsilon=cfg.norm_eps,
                 activation_function="gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
                 resid_pdrop=d, embd_pdrop=d, attn_pdrop=d, **({"bos_token_id": 50256, "eos_token_id": 50256}
                                                              if cfg.vocab_size == 50257 else {}))
    elif arch == "LlamaForCausalLM":
        c = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                 intermediate_size=cfg.ffn_hidden,
                 num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                 head_dim=cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                 rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                 hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=d)
    elif arch == "T5ForConditionalGeneration":
        c = dict(model_type="t5", vocab_size=cfg.vocab_size, d_model=cfg.n_embd, d_kv=cfg.n_embd // cfg.n_head,
                 d_ff=cfg.ffn_hidden, num_layers=cfg.n_layer, num_decoder_layers=cfg.n_dec_layer, num_heads=cfg.n_head,
                 relative_attention_num_buckets=cfg.relative_attention_num_buckets, n_positions=cfg.block_size,
                 relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=d,
                 layer_norm_epsilon=cfg.norm_eps, feed_forward_proj={v: k for k, v in T5_MLP.items()}[cfg.mlp],
                 is_encoder_decoder=True,
                 **({} if start_id is None else dict(pad_token_id=start_id, decoder_start_token_id=start_id)))
    else:
        c = dict(model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                 num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_hidden,
                 max_position_embeddings=cfg.block_size,
                 type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=d,
                 attention_probs_dropout_prob=d, hidden_act="gelu_new" if cfg.gelu_approx == "tanh" else "gelu")
        if cfg.head == "classify":
            c["id2label"] = {str(i): str(labels[i]) if labels else f"LABEL_{i}" for i in range(cfg.n_labels)}
            c["label2id"] = {v: int(k) for k, v in c["id2label"].items()}
    return dict(architectures=[arch], **c, tie_word_embeddings=cfg.tie_embeddings)


# -----------------------------------------------------------------------------------------------
# the weight map

def groups(cfg, arch, prefix="bert."):
    """[(anvil names, [(HF name, transform)])], the tied head excluded (head_name gives its HF name).
    Transforms: "id", "t" (GPT-2's Conv1D), ("rope", heads) (LLaMA's q/k rows)."""
    def lin(ours, theirs, tf="id", bias=True):  # a Linear or a norm: weight, and bias if it has one
        return ([([f"{ours}.weight"], [(f"{theirs}.weight", tf)])]
                + ([([f"{ours}.bias"], [(f"{theirs}.bias", "id")])] if bias else []))
    g = []
    if arch == "GPT2LMHeadModel":
        g += lin("tok_emb", "transformer.wte", bias=False) + lin("pos_emb", "transformer.wpe", bias=False)
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            g += lin(p + "norm1", h + "ln_1") + lin(p + "norm2", h + "ln_2")
            g += [([p + "attn.q.weight", p + "attn.kv.weight"], [(h + "attn.c_attn.weight", "t")]),  # c_attn = q, k, v
                  ([p + "attn.q.bias", p + "attn.kv.bias"], [(h + "attn.c_attn.bias", "id")])]
            g += lin(p + "attn.proj", h + "attn.c_proj", "t") + lin(p + "mlp.up", h + "mlp.c_fc", "t")
            g += lin(p + "mlp.down", h + "mlp.c_proj", "t")
        g += lin("norm", "transformer.ln_f")
    elif arch == "LlamaForCausalLM":
        g += lin("tok_emb", "model.embed_tokens", bias=False)
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            g += lin(p + "norm1", h + "input_layernorm", bias=False)
            g += lin(p + "norm2", h + "post_attention_layernorm", bias=False)
            g += [([p + "attn.q.weight"], [(h + "self_attn.q_proj.weight", ("rope", cfg.n_head))]),
                  ([p + "attn.kv.weight"], [(h + "self_attn.k_proj.weight", ("rope", cfg.n_kv_head)),
                                            (h + "self_attn.v_proj.weight", "id")]),
                  ([p + "mlp.up.weight"],  # the gate first, as MLP's chunk
                   [(h + "mlp.gate_proj.weight", "id"), (h + "mlp.up_proj.weight", "id")])]
            g += lin(p + "attn.proj", h + "self_attn.o_proj", bias=False)
            g += lin(p + "mlp.down", h + "mlp.down_proj", bias=False)
        g += lin("norm", "model.norm", bias=False)
    elif arch == "T5ForConditionalGeneration":
        g += lin("tok_emb", "shared", bias=False)
        for stack, ours, n in (("encoder", "", cfg.n_layer), ("decoder", "dec_", cfg.n_dec_layer)):
            g += lin(ours + "rel_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias", bias=False)
            for i in range(n):  # each block a list of layers: self-attention, (cross-attention,) feed-forward
                p, h = f"{ours}blocks.{i}.", f"{stack}.block.{i}.layer."
                attns = [("norm1", "attn", "0.SelfAttention")]
                attns += [("norm_cross", "cross", "1.EncDecAttention")] if ours else []
                for norm, a, t5 in attns:
                    g += lin(p + norm, h + t5[0] + ".layer_norm", bias=False)
                    g += lin(p + a + ".q", h + t5 + ".q", bias=False)
                    g += [([p + a + ".kv.weight"], [(h + t5 + ".k.weight", "id"), (h + t5 + ".v.weight", "id")])]
                    g += lin(p + a + ".proj", h + t5 + ".o", bias=False)
                f = f"{h}{len(attns)}."
                wi = ["wi_0", "wi_1"] if cfg.mlp in M.GATED else ["wi"]  # gate first: MLP's chunk
                g += [([p + "mlp.up.weight"], [(f"{f}DenseReluDense.{w}.weight", "id") for w in wi])]
                g += lin(p + "norm2", f + "layer_norm", bias=False)
                g += lin(p + "mlp.down", f + "DenseReluDense.wo", bias=False)
            g += lin(ours + "norm", f"{stack}.final_layer_norm", bias=False)
    else:
        b = prefix
        g += lin("tok_emb", b + "embeddings.word_embeddings", bias=False)
        g += lin("type_emb", b + "embeddings.token_type_embeddings", bias=False)
        g += lin("pos_emb", b + "embeddings.position_embeddings", bias=False) + lin("norm", b + "embeddings.LayerNorm")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"{b}encoder.layer.{i}."
            g += lin(p + "attn.q", h + "attention.self.query")
            g += [([p + f"attn.kv.{leaf}"],
                   [(h + f"attention.self.key.{leaf}", "id"), (h + f"attention.self.value.{leaf}", "id")])
                  for leaf in ("weight", "bias")]
            g += lin(p + "attn.proj", h + "attention.output.dense") + lin(p + "norm1", h + "attention.output.LayerNorm")
            g += lin(p + "mlp.up", h + "intermediate.dense") + lin(p + "mlp.down", h + "output.dense")
            g += lin(p + "norm2", h + "output.LayerNorm")
        g += lin("pooler", b + "pooler.dense")
        if cfg.head == "mlm_nsp":
            g += lin("mlm_dense", "cls.predictions.transform.dense")
            g += lin("mlm_norm", "cls.predictions.transform.LayerNorm")
            g += [(["lm_head.bias"], [("cls.predictions.bias", "id")])] + lin("nsp_head", "cls.seq_relationship")
        else:
            g += lin("cls_head", "classifier")
    if not cfg.tie_embeddings and cfg.head != "classify":
        g += [(["lm_head.weight"], [(head_name(arch), "id")])]
    return g


def head_name(arch):
    return "cls.predictions.decoder.weight" if arch.startswith("Bert") else "lm_head.weight"


def to_ours(t, tf):
    if tf == "t":
        return t.t()
    if tf != "id":  # HF's per-head [first halves | second halves] rows -> anvil's interleaved (even, odd) pairs
        H = tf[1]
        return t.reshape(H, 2, t.size(0) // H // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t


def to_theirs(t, tf):
    if tf == "t":
        return t.t()
    if tf != "id":  # the inverse of to_ours
        H = tf[1]
        return t.reshape(H, t.size(0) // H // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t


# -----------------------------------------------------------------------------------------------
# import: a Hugging Face folder (or hub name) as an anvil fine-tune checkpoint

def resolve_folder(source):
    """A local folder, or a hub name downloaded (config and weights only) by huggingface_hub."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        raise UserError(f"init_from='hf:{source}': not a folder with config.json and model weights")
    hub = need("huggingface_hub", "huggingface_hub")
    try:
        return hub.snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"])
    except Exception as e:
        raise UserError(f"init_from='hf:{source}': cannot download it from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150]})") from None


def open_weights(folder):
    """(names, get): the tensor names of a folder's weights and a function reading one tensor. safetensors
    files are read tensor by tensor; a pytorch_model.bin is memory-mapped (weights_only: no code on load)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = json.load(f)["weight_map"]
            break
        if os.path.exists(os.path.join(folder, single)):
            files = None
            break
    else:
        raise UserError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    opened = {}

    def load(file):
        if file not in opened:
            path = os.path.join(folder, file)
            if file.endswith(".safetensors"):
                opened[file] = need("safetensors", "safetensors").safe_open(path, framework="pt")
            else:
                try:  # weights_only: a file crafted to run code on load is refused
                    opened[file] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:150]})") from None
        return opened[file]
    if files is None:
        files = {k: single for k in load(single).keys()}

    def get(name):
        f = load(files[name])
        return f.get_tensor(name) if hasattr(f, "get_tensor") else f[name]  # safetensors handle, or a state dict
    return set(files), get


def import_state(folder, arch, cfg, shard=None):
    """anvil's state dict from a folder's weights, one group at a time (never a second full copy). With
    shard=(rank, world), FSDP's: each tensor keeps only this rank's dim-0 chunk, so a rank holds its shards."""
    names, get = open_weights(folder)
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""  # BertModel files have no prefix
    with torch.device("meta"):
        skeleton = M.from_config(cfg)
    rows = {k: v.shape[0] for k, v in skeleton.state_dict().items()}
    state, used = {}, set()
    for ours, theirs in groups(cfg, arch, prefix):
        missing = [n for n, _ in theirs if n not in names]
        if missing and arch == "BertModel" and ours[0].startswith(M.HEAD_PREFIXES):  # no pretraining heads: fresh ones
            state.update({k: skeleton.init_tensor(k, skeleton.get_parameter(k).shape) for k in ours})
            continue
        if missing == ["lm_head.weight"] and arch == "T5ForConditionalGeneration":  # tied, unscaled: from_hf_config
            theirs, missing = [("shared.weight", "id")], []
        if missing:
            raise UserError(f"{folder} lacks weight {missing[0]!r} that its config.json implies")
        parts = [to_ours(get(n), tf) for n, tf in theirs]
        joined = torch.cat(parts) if len(parts) > 1 else parts[0]
        for k, t in zip(ours, joined.split([rows[k] for k in ours])):
            state[k] = dim0_shard(t, *shard).clone() if shard else t.contiguous()
        used.update(n for n, _ in theirs)
    head, emb = head_name(arch), groups(cfg, arch, prefix)[0][1][0][0]  # the first group is the embedding
    if cfg.tie_embeddings and cfg.head != "classify":
        if head in names and not torch.equal(get(head), get(emb)):
            raise UserError(f"config.json has tie_word_embeddings=true but {head} differs from the embedding: "
                            f"set tie_word_embeddings=false in {folder}/config.json")
        state["lm_head.weight"] = state["tok_emb.weight"]
        used.add(head)
    extra = sorted(n for n in names - used if not n.endswith(DERIVED))
    if extra:
        raise UserError(f"{folder} has weight {extra[0]!r} ({len(extra)} unused) that anvil's {arch} does not have")
    return state


def read_config(source):
    """(folder, architecture, ModelConfig) of init_from='hf:SOURCE' (a hub name is downloaded first)."""
    folder = resolve_folder(os.path.expanduser(source))
    try:
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json cannot be read: {type(e).__name__}: {e}") from None
    try:
        return (folder, *from_hf_config(c))
    except KeyError as e:
        raise UserError(f"{folder}/config.json lacks the field {e.args[0]!r}") from None


def load_checkpoint(source, corpus_meta=None, shard=None):
    """init_from='hf:SOURCE' as a checkpoint dict like a fine-tune's: model, model_args, meta. Hugging Face
    folders carry their own tokenizer, anvil's corpora a tiktoken or bytes one: GPT-2's 50257-token
    vocabulary must pair with a corpus prepared with --tokenizer=gpt2; any other model is trusted with the
    corpus's tokenizer, as long as its vocabulary covers the corpus (train.py checks the ids)."""
    folder, arch, cfg = read_config(source)
    gpt2 = arch == "GPT2LMHeadModel" and cfg.vocab_size == 50257
    if gpt2 and corpus_meta is not None and corpus_meta["tokenizer"] != "gpt2":
        raise UserError(f"hf:{source} is a GPT-2 model with GPT-2's tokenizer, the dataset uses "
                        f"{corpus_meta['tokenizer']!r}; prepare it with --tokenizer=gpt2")
    meta = dict(corpus_meta or {"tokenizer": "gpt2" if gpt2 else "unknown", "vocab_size": cfg.vocab_size}, hf=source)
    return {"model": import_state(folder, arch, cfg, shard), "model_args": asdict(cfg), "meta": meta,
            **({"shard": shard} if shard else {})}


# -----------------------------------------------------------------------------------------------
# export: an anvil model as a Hugging Face folder

def export(net, ckpt, out_dir, max_shard_bytes=5 * 2**30):
    """Write config.json and model.safetensors (shards and model.safetensors.index.json above max_shard_bytes),
    plus the tokenizer files: GPT-2's when the checkpoint's corpus used tiktoken's gpt2, the corpus's own
    tokenizer.json (and the tokenizer_config.json beside it) when it used one. One shard in memory at a time."""
    st = need("safetensors.torch", "safetensors")
    cfg, meta = net.cfg, ckpt.get("meta") or {}
    arch = arch_of(cfg)
    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):  # a previous export's weights: from_pretrained would prefer a stale single file
        if old.startswith("model") and old.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, old))
    shards, shard, size, total = [], {}, 0, 0

    def flush():
        if shard:
            tmp = os.path.join(out_dir, f"shard-{len(shards)}.tmp")
            st.save_file(shard, tmp, metadata={"format": "pt"})
            shards.append((tmp, list(shard)))
            shard.clear()
    for name, t in hf_tensors(net, arch):
        n = t.numel() * t.element_size()
        if size + n > max_shard_bytes and shard:
            flush()
            size = 0
        shard[name], size, total = t, size + n, total + n
    flush()
    weight_map = {}
    for i, (tmp, keys) in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, file))
        weight_map.update({k: file for k in keys})
    if len(shards) > 1:
        write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype = str(next(net.parameters()).dtype).split(".")[-1]
    config = to_hf_config(cfg, arch, meta.get("labels"), t5_start_id(cfg, meta))
    write_json(os.path.join(out_dir, "config.json"), dict(config, dtype=dtype))
    note = ""
    if meta.get("tokenizer") == "gpt2" and cfg.vocab_size >= 50257 and cfg.causal:
        written = write_gpt2_tokenizer(out_dir, cfg.block_size)
        note = " and GPT-2's tokenizer" if written else " (no tokenizer: tiktoken's gpt2 unavailable)"
    elif str(meta.get("tokenizer")).endswith(".json") and os.path.isfile(meta["tokenizer"]):  # a tokenizer.json corpus
        config = os.path.join(os.path.dirname(meta["tokenizer"]), "tokenizer_config.json")
        for src, name in ((meta["tokenizer"], "tokenizer.json"), (config, "tokenizer_config.json")):
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
        note = " and the corpus's tokenizer.json"
    print(f"wrote {out_dir}: {arch}, {net.num_params():,} parameters in {len(shards)} file(s){note}")
    return arch


def t5_start_id(cfg, meta):
    """An anvil encoder-decoder's decoder start id: [PAD], as T5's is its pad, when the vocabulary is a corpus's
    with the specials after it (data.special_ids); else None (T5's own, 0)."""
    import data
    if cfg.n_dec_layer and meta.get("vocab_size") and meta["vocab_size"] + data.N_SPECIAL <= cfg.vocab_size:
        return data.special_ids(meta["vocab_size"]).pad
    return None


def hf_tensors(net, arch):
    """(HF name, tensor) for each Hugging Face weight of an anvil model, each a contiguous CPU copy of its own."""
    sd = net.state_dict()
    for ours, theirs in groups(net.cfg, arch):
        joined = torch.cat([sd[k] for k in ours]) if len(ours) > 1 else sd[ours[0]]
        for (name, tf), part in zip(theirs, joined.chunk(len(theirs))):
            # a copy each: safetensors refuses tensors sharing storage (the chunks of one joined tensor)
            yield name, to_theirs(part.detach().cpu(), tf).clone(memory_format=torch.contiguous_format)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def gpt2_vocab_merges():
    """GPT-2's vocab.json and merges.txt contents, rebuilt offline from tiktoken's gpt2 encoding: each token's
    merge is the last step of byte-pair encoding its bytes with the merges ranked below it."""
    from tokenizer import get_tokenizer
    get_tokenizer("gpt2")  # a UserError when tiktoken or its files are missing
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ranks = enc._mergeable_ranks  # bytes -> id: tiktoken's one table (no public accessor)
    # GPT-2's printable stand-ins for bytes: printable Latin-1 maps to itself, the rest to 256 + n
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    char = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
    text = lambda bs: "".join(char[b] for b in bs)
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            parts = [bytes([b]) for b in token]
            while len(parts) > 2:  # merge the best-ranked pair, as BPE does, until two parts remain
                pairs = [(ranks[a + b], j) for j, (a, b) in enumerate(zip(parts, parts[1:]))
                         if ranks.get(a + b, rank) < rank]
                if not pairs:
                    break
                i = min(pairs)[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab["<|endoftext|>"] = enc.eot_token
    return vocab, merges


def write_gpt2_tokenizer(out_dir, max_length):
    try:
        vocab, merges = gpt2_vocab_merges()
    except (UserError, ImportError):
        return False
    write_json(os.path.join(out_dir, "vocab.json"), vocab)
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    atomic_write(os.path.join(out_dir, "merges.txt"), lambda f: f.write(merges_txt.encode()))
    eot = "<|endoftext|>"
    write_json(os.path.join(out_dir, "tokenizer_config.json"), dict(
        tokenizer_class="GPT2Tokenizer", bos_token=eot, eos_token=eot, unk_token=eot, model_max_length=max_length,
        add_prefix_space=False))
    write_json(os.path.join(out_dir, "special_tokens_map.json"), dict(bos_token=eot, eos_token=eot, unk_token=eot))
    return True
