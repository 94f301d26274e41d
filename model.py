"""
The whole Transformer in one file: GPT-2 style (learned positions, LayerNorm, GELU, tied
embeddings), LLaMA style (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied), BERT style
(bidirectional, post-LN, segment embeddings, MLM + NSP or classification heads) and T5 style (an
encoder-decoder: relative position bias, RMSNorm, ReLU or gated GELU, decoder blocks with cross-attention),
chosen by ModelConfig fields, plus a table of named presets. This file knows nothing about parallelism:
train.py applies DDP/FSDP, compile and activation checkpointing from outside, per block.

Shapes: B batch, T sequence (S: an encoder-decoder's source), C n_embd, H heads, Hkv key/value heads, D head
dim, V vocab.
"""
import math
import zlib
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024      # longest sequence; the size of the position table / RoPE cache
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0          # 0 means n_head (multi-head); fewer shares K/V across heads (GQA)
    n_embd: int = 768
    ffn_hidden: int = 0         # 0 means 4*C for gelu/relu, LLaMA's 8/3*C rounded up to multiple_of when gated
    multiple_of: int = 256
    norm: str = "layernorm"     # layernorm | rmsnorm
    mlp: str = "gelu"           # gelu | swiglu | relu (T5) | geglu (T5 v1.1: gelu(gate) * value)
    pos: str = "learned"        # learned | rope | relative: T5's bias per head for bucketed distances, and with
                                # it T5's init, unscaled attention, and a tied head's input scaled by C^-0.5
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # distances beyond share T5's last bucket
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    qk_norm: bool = False       # RMSNorm of each head's q and k (before RoPE): bounded attention logits
    norm_eps: float = 1e-5
    dropout: float = 0.0
    causal: bool = True         # False: bidirectional attention (the BERT path)
    gelu_approx: str = "none"   # none: exact erf GELU (nanoGPT, BERT; on CPU 4x cheaper) | tanh (GPT-2's, T5 v1.1's weights)
    post_norm: bool = False     # True: BERT's post-LN, norm after each residual add and on the embeddings, none at the end
    type_vocab_size: int = 0    # >0: segment (token type) embeddings added to the input, BERT's sentence A/B
    head: str = "lm"            # lm: next-token logits | mlm_nsp: BERT pretraining | classify: n_labels classes
    n_labels: int = 0           # classes of the classify head, predicted from the pooled first position ([CLS])
    n_dec_layer: int = 0        # >0: an encoder-decoder (T5): n_layer encoder blocks, then n_dec_layer decoder blocks

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_embd a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; n_kv_head must divide n_head")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head dim, got n_embd/n_head={self.n_embd // self.n_head}")
        for key, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu", "relu", "geglu")),
                             ("pos", ("learned", "rope", "relative")), ("gelu_approx", ("tanh", "none")),
                             ("head", ("lm", "mlm_nsp", "classify"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        if self.head != "lm" and self.causal:
            raise ValueError(f"head={self.head!r} reads the whole sequence from position 0; it needs causal=False")
        if self.head == "classify" and self.n_labels < 2:
            raise ValueError(f"head='classify' needs n_labels >= 2, got {self.n_labels}")
        for key, want in (("head", "lm"), ("causal", False), ("pos", "relative"), ("post_norm", False),
                          ("type_vocab_size", 0)) if self.n_dec_layer else ():
            if getattr(self, key) != want:
                raise ValueError(f"an encoder-decoder (n_dec_layer={self.n_dec_layer}) needs {key}={want!r}, "
                                 f"got {getattr(self, key)!r}")
        if not self.ffn_hidden:  # 4C; a gated unit (two up projections): LLaMA's 8/3 C, rounded up to multiple_of
            gated = self.multiple_of * math.ceil(int(8 * self.n_embd / 3) / self.multiple_of)
            self.ffn_hidden = gated if self.mlp in GATED else 4 * self.n_embd


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False, bias=False, vocab_size=32000)
_BERT = dict(causal=False, post_norm=True, norm_eps=1e-12, type_vocab_size=2, head="mlm_nsp",
             vocab_size=30522, block_size=512)
_T5 = dict(causal=False, pos="relative", norm="rmsnorm", norm_eps=1e-6, mlp="relu", bias=False, vocab_size=32128,
           block_size=512, gelu_approx="tanh")  # tanh: T5 v1.1's gated GELU (mlp="geglu")
PRESETS = {
    # the quickstart model: bytes vocabulary, trains on a 2-core CPU in minutes
    "tiny": dict(_LLAMA, vocab_size=257, block_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
                 multiple_of=32, tie_embeddings=True),
    # GPT-2 (Radford et al. 2019); parameter counts include the learned position table
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # LLaMA-style sizes for experiments and benchmarks
    "llama-50m": dict(_LLAMA, block_size=1024, n_layer=8, n_head=8, n_kv_head=4, n_embd=512),
    "llama-150m": dict(_LLAMA, block_size=2048, n_layer=16, n_head=12, n_kv_head=4, n_embd=768),
    "llama-1b": dict(_LLAMA, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                     ffn_hidden=5632),  # the TinyLlama-1.1B shape
    "llama-7b": dict(_LLAMA, block_size=4096, n_layer=32, n_head=32, n_embd=4096),  # LLaMA-2-7B
    # BERT (Devlin et al. 2018): counts equal Hugging Face BertForPreTraining with its 30,522 WordPiece vocabulary
    "bert-tiny": dict(_BERT, vocab_size=261, block_size=256, n_layer=4, n_head=4, n_embd=128),  # bytes + 4 specials, CPU
    "bert-base": dict(_BERT, n_layer=12, n_head=12, n_embd=768),     # 110,106,428 parameters
    "bert-large": dict(_BERT, n_layer=24, n_head=16, n_embd=1024),   # 336,226,108
    # T5 (Raffel et al. 2020): counts equal Hugging Face T5ForConditionalGeneration with its 32,128-token vocabulary
    "t5-tiny": dict(_T5, vocab_size=361, n_layer=4, n_dec_layer=4, n_head=4, n_embd=128),  # bytes+4+100 sentinels, CPU
    "t5-small": dict(_T5, n_layer=6, n_dec_layer=6, n_head=8, n_embd=512),     # 60,506,624 parameters
    "t5-base": dict(_T5, n_layer=12, n_dec_layer=12, n_head=12, n_embd=768),   # 222,903,552
}


def config_from_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in fields(ModelConfig)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {bad}; valid fields: {sorted(names)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def mix_seed(seed: int, n: int) -> int:
    """One generator seed from the run's seed and a number (a step, a parameter name's hash): the one
    formula behind initialisation, data order and dropout, so each is a pure function of the seed."""
    return seed * 1_000_003 + n


def Norm(cfg):
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(cfg, device=None):
    """cos/sin tables (block_size, D/2) for rotary embeddings, computed in fp32."""
    d = cfg.n_embd // cfg.n_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    t = torch.arange(cfg.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    # x (B, H, T, D); rotate each (even, odd) pair of channels by a position-dependent angle
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def relative_bias(table, T, pos, bidirectional, cfg):
    """T5's position bias (1, H, T, pos + T), queries at pos.. over keys 0.., from table (nn.Embedding(buckets, H)):
    a bucket per distance key - query, exact when small, log-spaced up to max_distance. Bidirectional (encoder):
    half the buckets for each sign; one-way (decoder): the past only, future keys -inf (the causal mask)."""
    dev = table.weight.device
    rel = torch.arange(pos + T, device=dev)[None, :] - torch.arange(pos, pos + T, device=dev)[:, None]  # (T, pos + T)
    n, bucket = cfg.relative_attention_num_buckets, 0
    if bidirectional:
        n //= 2
        bucket, dist = (rel > 0).long() * n, rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n // 2  # the same float ops as Hugging Face's T5, so the buckets are equal at the boundaries
    log = exact + (torch.log(dist.float() / exact) / math.log(cfg.relative_attention_max_distance / exact)
                   * (n - exact)).long()
    bias = table(bucket + torch.where(dist < exact, dist, log.clamp(max=n - 1))).permute(2, 0, 1)[None]
    return bias if bidirectional else bias.masked_fill(rel > 0, float("-inf"))


try:  # enable_gqa (torch 2.5+): SDPA lets each K/V head serve its group of query heads, without copies
    F.scaled_dot_product_attention(*torch.zeros(3, 1, 1, 1, 1), enable_gqa=True)
    SDPA_GQA = True
except TypeError:
    SDPA_GQA = False


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=cfg.bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init, see Transformer.init_tensor
        self.scale = 1.0 if cfg.pos == "relative" else None  # T5 folds 1/sqrt(D) into q's init instead
        if cfg.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps), nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)

    def forward(self, x, rope=None, cache=None, pos=0, attn_mask=None, memory=None):
        """Self-attention over x (B, T, C), or with memory (B, S, C) cross-attention: keys and values from
        memory. attn_mask: bool (True: attend) or float (added to the scores: T5's position bias)."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if memory is not None and cache:  # cross-attention while generating: K/V kept from the first step
            k, v = cache["k"], cache["v"]
        else:
            src = x if memory is None else memory
            k, v = self.kv(src).view(B, src.size(1), 2, self.n_kv_head, -1).permute(2, 0, 3, 1, 4)  # (B, Hkv, S, D)
            k = self.k_norm(k) if self.cfg.qk_norm else k
        q = self.q_norm(q) if self.cfg.qk_norm else q
        if rope is not None:
            cos, sin = rope[0][pos:pos + T], rope[1][pos:pos + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if memory is not None and cache is not None:
            cache.update(k=k, v=v)
        elif cache is not None:  # KV cache for generation: write this chunk, attend over all so far
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]
        causal = self.cfg.causal and attn_mask is None
        if causal and cache is not None and pos > 0:
            # query i sits at absolute position pos+i and may see keys 0..pos+i
            attn_mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            causal = False
        grouped = self.n_kv_head != self.n_head  # GQA: each K/V head serves n_head/n_kv_head query heads
        # SDPA broadcasts K/V over their query heads itself (torch 2.5+, no mask), so backward keeps them at
        # their own width; with a mask (KV-cache decoding, padding) or an older torch, repeat them to (B, H, T, D)
        native = grouped and SDPA_GQA and attn_mask is None
        if grouped and not native:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale,
                                           dropout_p=self.cfg.dropout if self.training else 0.0,
                                           **({"enable_gqa": True} if native else {}))
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


GATED = ("swiglu", "geglu")  # the MLPs whose activation gates a second (value) projection


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind, self.gelu_approx = cfg.mlp, cfg.gelu_approx
        self.up = nn.Linear(cfg.n_embd, (2 if cfg.mlp in GATED else 1) * cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True

    def forward(self, x):
        h = self.up(x)  # (B, T, F), or (B, T, 2F): a gated unit's gate and value halves
        gate, val = h.chunk(2, dim=-1) if self.kind in GATED else (h, None)
        if self.kind == "swiglu":
            h = F.silu(gate)
        else:
            h = F.relu(gate) if self.kind == "relu" else F.gelu(gate, approximate=self.gelu_approx)
        return self.down(h if val is None else h * val)


class Block(nn.Module):
    def __init__(self, cfg, cross=False):
        super().__init__()
        self.norm1, self.attn = Norm(cfg), Attention(cfg)
        if cross:  # an encoder-decoder's decoder block: attention over the encoder's output, between the two
            self.norm_cross, self.cross = Norm(cfg), Attention(cfg)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.post_norm

    def forward(self, x, rope=None, cache=None, pos=0, attn_mask=None, memory=None, memory_mask=None):
        if self.post_norm:  # BERT: normalise the sum, so the residual stream itself is normalised
            x = self.norm1(x + self.drop(self.attn(x, rope, cache, pos, attn_mask)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, pos, attn_mask))
        if memory is not None:
            x = x + self.drop(self.cross(self.norm_cross(x), cache=cache["cross"] if cache is not None else None,
                                         attn_mask=memory_mask, memory=memory))
        return x + self.drop(self.mlp(self.norm2(x)))


LOSS_CHUNK_BYTES = 2**28  # fp32 logits per chunk of the fused LM loss (256 MiB); 0: the plain path, for comparison


class LinearCrossEntropy(torch.autograd.Function):
    """The LM head and its mean cross-entropy over targets != -1, fused for training. The plain path keeps
    (N, V) logits, their fp32 log-softmax and, in backward, two dense fp32 gradients: ~8 GiB for GPT-2 at
    12 x 1024 in bf16. Here forward walks the N = B*T rows in chunks of LOSS_CHUNK_BYTES of fp32 logits
    and, per chunk, takes the loss and at once its gradient w.r.t. the logits, hence w.r.t. the head's
    input and weight; backward only scales those by grad_output. Nothing is recomputed: per chunk the
    forward matmul and backward's two, so the FLOPs equal the plain path's (flops_per_token holds)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, dtype):
        # x (N, C), weight (V, C), bias (V,) or None, targets (N,); dtype: the matmuls' (autocast's, else x's)
        N, V = x.size(0), weight.size(0)
        rows = max(1, LOSS_CHUNK_BYTES // (4 * V))
        w = weight.to(dtype)  # cast once, as autocast casts nn.Linear's weight
        b = bias.to(dtype) if bias is not None else None
        grad_x = torch.empty(N, x.size(1), dtype=dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)  # fp32 sum over chunks
        grad_b = torch.zeros(V, dtype=torch.float32, device=x.device) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, N, rows):
            xc, t = x[i:i + rows].to(dtype), targets[i:i + rows, None]  # (n, C), (n, 1)
            keep = t != -1
            t = t.clamp(min=0)
            z = F.linear(xc, w, b).float()  # (n, V) logits in fp32, as the plain path's logits.float()
            target, top = z.gather(1, t), z.amax(-1, keepdim=True)  # (n, 1)
            z = z.sub_(top).exp_()  # in place from here on: one (n, V) fp32 buffer per chunk
            total = z.sum(-1, keepdim=True)
            loss += ((total.log() + top - target) * keep).sum()  # log-sum-exp minus the target's logit
            # d(the chunk's summed loss)/d(logits) = softmax - one-hot(target), zero on ignored rows. Left
            # unnormalised (1/count and the loss scale come in backward) so that fp16 keeps its range
            z = z.div_(total).scatter_add_(1, t, -torch.ones_like(total)).mul_(keep)
            if grad_b is not None:
                grad_b += z.sum(0)
            z = z.to(dtype)  # under autocast this frees the fp32 buffer before the matmuls
            grad_x[i:i + rows] = z @ w
            grad_w += z.t() @ xc
        count = (targets != -1).sum()
        ctx.save_for_backward(grad_x, grad_w, grad_b, count)
        ctx.dtypes = x.dtype, weight.dtype, bias.dtype if bias is not None else None
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b, count = ctx.saved_tensors
        scale = grad_loss / count  # the mean's 1/count times what comes from above (e.g. GradScaler's scale)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return (grad_x.to(x_dtype) * scale, (grad_w * scale).to(w_dtype),
                (grad_b * scale).to(b_dtype) if grad_b is not None else None, None, None)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd) if cfg.type_vocab_size else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = Norm(cfg)  # the final norm, or with post_norm the embedding norm
        if cfg.pos == "relative":  # T5: computed once per stack, shared by its blocks
            self.rel_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_head)
        if cfg.n_dec_layer:  # the decoder: its own blocks, bias and final norm; the embedding is shared
            self.dec_blocks = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_dec_layer))
            self.dec_rel_bias, self.dec_norm = nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_head), Norm(cfg)
        # heads: only the ones this config uses exist, so DDP never sees an unused parameter
        C = cfg.n_embd
        if cfg.head != "lm":  # BERT's pooler: the first position ([CLS]) through dense + tanh
            self.pooler = nn.Linear(C, C)
        if cfg.head == "mlm_nsp":
            self.mlm_dense, self.mlm_norm = nn.Linear(C, C), Norm(cfg)  # the MLM transform before the decoder
            self.nsp_head = nn.Linear(C, 2)  # IsNext (0) / NotNext (1)
        if cfg.head == "classify":
            self.cls_head = nn.Linear(C, cfg.n_labels)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=cfg.head == "mlm_nsp") if cfg.head != "classify" else None
        if cfg.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables are derived, not learned: non-persistent, rebuilt by init_weights after to_empty
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_tensor(self, name, shape, seed=0, device="cpu"):
        """The initial value of parameter `name`, from a generator seeded by (seed, name): any rank
        can make the same value for any parameter, so a sharded init equals a single-process one."""
        leaf = name.rsplit(".", 1)[-1]
        module = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return torch.ones(shape, device=device) if leaf == "weight" else torch.zeros(shape, device=device)
        if leaf == "bias":
            return torch.zeros(shape, device=device)
        if self.cfg.pos == "relative":  # T5's: unit embeddings, else 1/sqrt(fan in); q also 1/sqrt(D): unscaled attention
            fan_in = shape[-1] if isinstance(module, nn.Linear) else self.cfg.n_embd
            std = 1.0 if name == "tok_emb.weight" else fan_in ** -0.5
            std *= (self.cfg.n_embd // self.cfg.n_head) ** -0.5 if name.endswith(".q.weight") else 1.0
        else:  # GPT-2 scales the residual projections down so that the pre-LN residual stream does not grow
            # with depth; post-LN renormalises every sum, and BERT draws everything with 0.02
            scaled = getattr(module, "residual", False) and not self.cfg.post_norm
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if scaled else 0.02
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, zlib.crc32(name.encode())))
        return torch.randn(shape, generator=g, device=device) * std

    @torch.no_grad()
    def init_weights(self, seed=0):
        for name, p in self.named_parameters():
            p.copy_(self.init_tensor(name, p.shape, seed, p.device))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        """Rebuild what to_empty() loses: the tied head (it unties shared weights) and the RoPE tables."""
        if self.cfg.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight
        if self.cfg.pos == "rope":
            device = self.tok_emb.weight.device
            self.rope_cos, self.rope_sin = rope_cache(self.cfg, device="cpu" if device.type == "meta" else device)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.pos_emb, self.type_emb) if e is not None)
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list | None = None, pos: int = 0,
                attn_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, dec_idx: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> tuple:
        """idx (B, T) token ids. targets (B, T): next tokens (head lm) or the original ids at the positions
        chosen for MLM, -1 elsewhere (ignored). attn_mask (B, T) bool, True at real tokens: padding keys are
        never attended. token_type_ids (B, T) segment ids. labels (B,): NSP (0 IsNext, 1 NotNext) or class.
        Returns (logits, loss); loss is None without targets/labels. Logits by head: lm (B, T, V) (B, 1, V with
        a cache), but None when targets are given while autograd records (training: the fused LinearCrossEntropy
        never forms them; under no_grad, evaluation, they are returned); mlm_nsp (mlm (B, T, V) without targets;
        with targets (B, K, V) at mlm_positions(targets), K = mlm_slots(T): each row's chosen positions in order,
        then filler slots whose target is -1; a row may choose at most K positions (data.mask_tokens never
        chooses more): more would leave the loss; nsp (B, 2)); classify (B, n_labels).
        An encoder-decoder: idx (B, S) the source, attn_mask (B, S) its padding, dec_idx (B, T) the decoder's input
        (start id, then the target shifted right), targets (B, T); logits and loss as head lm's, over the decoder's
        positions (cache and pos are the decoder's). memory: the encoder's output (B, S, C), from generate()."""
        if not self.cfg.n_dec_layer:
            x = self.encode(idx, attn_mask, cache, pos, token_type_ids)
        elif dec_idx is None:
            raise ValueError("an encoder-decoder needs dec_idx, the decoder's input ids")
        else:
            memory = self.drop(self.encode(idx, attn_mask)) if memory is None else memory
            x = self.decode(dec_idx, memory, attn_mask, cache, pos)
        if self.cfg.head != "lm":
            return self.encoder_heads(x, targets, labels)
        if self.cfg.pos == "relative" and self.cfg.tie_embeddings:  # T5: before the tied, unit-variance embedding
            x = x * self.cfg.n_embd ** -0.5
        if targets is None:
            return self.lm_head(x[:, -1:]) if cache is not None else self.lm_head(x), None
        head = self.lm_head
        if LOSS_CHUNK_BYTES and torch.is_grad_enabled() and head.weight.requires_grad:  # training: fused
            dev = x.device.type  # the matmuls' dtype: what autocast would give nn.Linear
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), head.weight, head.bias, targets.flatten(), dtype)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def encode(self, idx, attn_mask=None, cache=None, pos=0, token_type_ids=None):
        """The embeddings and `blocks`, to the hidden states (B, T, C) after the final norm: a decoder-only
        model's or BERT's whole body, an encoder-decoder's encoder."""
        B, T = idx.shape
        if pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
        if self.type_emb is not None:  # no ids: all segment 0, as in BERT (and the table is always used)
            x = x + self.type_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(idx))
        if self.cfg.post_norm:
            x = self.norm(x)
        x = self.drop(x)
        if attn_mask is not None and attn_mask.dim() == 2:  # a padding mask: (B, T) -> (B, 1, 1, T) over the keys
            if self.cfg.causal:
                raise ValueError("a padding mask is for the bidirectional model (causal=False)")
            attn_mask = attn_mask[:, None, None, :]
        if self.cfg.pos == "relative":  # the bias as a float mask, padding keys -inf in it: (1 or B, H, T, pos + T)
            bias = relative_bias(self.rel_bias, T, pos, not self.cfg.causal, self.cfg)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        rope = (self.rope_cos.to(x.device), self.rope_sin.to(x.device)) if self.cfg.pos == "rope" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache[i] if cache is not None else None, pos, attn_mask)
        return x if self.cfg.post_norm else self.norm(x)

    def decode(self, dec_idx, memory, attn_mask=None, cache=None, pos=0):
        """dec_idx (B, T) at positions pos.. through `dec_blocks`, which also attend to memory (B, S, C), the
        encoder's output, at its real tokens (attn_mask (B, S)): (B, T, C) after the final norm."""
        T = dec_idx.size(1)
        if pos + T > self.cfg.block_size:
            raise ValueError(f"target of {pos + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.drop(self.tok_emb(dec_idx))
        bias = relative_bias(self.dec_rel_bias, T, pos, False, self.cfg)  # one-way: also the causal mask
        memory_mask = attn_mask[:, None, None, :] if attn_mask is not None else None  # (B, 1, 1, S)
        for i, block in enumerate(self.dec_blocks):
            x = block(x, None, cache[i] if cache is not None else None, pos, bias, memory, memory_mask)
        return self.drop(self.dec_norm(x))

    def encoder_heads(self, x, targets=None, labels=None):
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C) from the [CLS] position
        if self.cfg.head == "classify":
            logits = self.cls_head(self.drop(pooled))  # (B, n_labels)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=-1) if labels is not None else None
            return logits, loss
        nsp = self.nsp_head(pooled)  # (B, 2)
        if targets is not None:  # the decoder only where there is something to predict: ~15% of positions
            pos = mlm_positions(targets)  # (B, K)
            x = x.gather(1, pos[..., None].expand(-1, -1, x.size(-1)))  # (B, K, C)
            targets = targets.gather(1, pos)  # (B, K), -1 in the filler slots
        h = self.mlm_norm(F.gelu(self.mlm_dense(x), approximate=self.cfg.gelu_approx))
        mlm = self.lm_head(h)  # (B, K, V) or (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(mlm.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            if labels is not None:
                loss = loss + F.cross_entropy(nsp.float(), labels)  # L = L_MLM + L_NSP
        return (mlm, nsp), loss

    def new_cache(self, batch_size, device, dtype):
        """Per decoder block: self-attention K/V, and cross-attention's, filled at an encoder-decoder's first step."""
        shape = (batch_size, self.cfg.n_kv_head, self.cfg.block_size, self.cfg.n_embd // self.cfg.n_head)
        return [dict(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype),
                     cross={}) for _ in range(self.cfg.n_dec_layer or self.cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 attn_mask: torch.Tensor | None = None, start_id: int | None = None,
                 stop_id: int | None = None, vocab: int | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens. temperature=0 is greedy. With use_cache, keys and values
        are kept per layer so each new token costs one position; when the cache is full the window is
        re-filled from the last block_size//2 tokens. vocab: draw only ids below it (the tokenizer's; the
        rows past it pad vocab_size for speed and mean nothing).
        An encoder-decoder reads idx (B, S) as the source (attn_mask: its padding), runs the encoder once and
        returns the target alone (B, n), without start_id, the decoder's first input; the cache keeps cross-
        attention K/V too. With stop_id, a row that has produced it repeats it; n < max_new_tokens when all have."""
        if self.cfg.n_dec_layer:
            if start_id is None:
                raise ValueError("an encoder-decoder's decoder starts from start_id: pass the one it was trained with")
            B = idx.size(0)
            out = torch.full((B, 1), start_id, dtype=torch.long, device=idx.device)
            memory = self.encode(idx, attn_mask)
            cache = self.new_cache(B, idx.device, memory.dtype) if use_cache else None
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for t in range(max_new_tokens):  # cached: the newest token alone, at position t
                step = dict(dec_idx=out[:, -1:], cache=cache, pos=t, memory=memory) if use_cache else dict(dec_idx=out)
                logits, _ = self(idx, attn_mask=attn_mask, **step)
                nxt = sample_next(logits[:, -1, :vocab].float(), temperature, top_k, top_p, generator)  # (B, 1)
                if stop_id is not None:
                    nxt = nxt.masked_fill(done[:, None], stop_id)
                    done |= nxt[:, 0] == stop_id
                out = torch.cat((out, nxt), dim=1)
                if done.all():
                    break
            return out[:, 1:]
        if not self.cfg.causal:
            raise ValueError("generate() needs a causal model; this one is bidirectional")
        cache, pos = None, 0
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -self.cfg.block_size:])
            else:
                if cache is None or pos >= self.cfg.block_size:  # (re)fill the cache from the context
                    ctx = idx[:, -(self.cfg.block_size // 2 if cache is not None else self.cfg.block_size):]
                    cache = self.new_cache(idx.size(0), idx.device, self.tok_emb.weight.dtype)
                    logits, _ = self(ctx, cache=cache, pos=0)
                    pos = ctx.size(1)
                else:
                    logits, _ = self(idx[:, -1:], cache=cache, pos=pos)
                    pos += 1
            logits = logits[:, -1, :vocab].float()  # (B, V), or (B, vocab)
            idx = torch.cat((idx, sample_next(logits, temperature, top_k, top_p, generator)), dim=1)
        return idx


def mlm_slots(T: int) -> int:
    """K, the positions per row the MLM decoder runs at: a function of T alone, so no shape depends on the
    data. At least the most data.mask_tokens chooses (round(0.15 n) of n <= T - 3 real tokens), with one
    to spare against float rounding."""
    return min(T, math.ceil(0.15 * T) + 1)


def mlm_positions(targets):
    """(B, K) positions: each row's targets != -1 in order, then filler positions (their target is -1).
    topk, not boolean indexing: a fixed shape and no host sync, so one compiled graph serves every batch."""
    T = targets.size(1)
    rank = torch.arange(T, 0, -1, device=targets.device)  # earlier chosen positions score higher
    return torch.topk(torch.where(targets != -1, rank, 0), mlm_slots(T), dim=1).indices


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, V): greedy at temperature 0, else top-k then nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


# the heads' parameters: what data.adapt_heads fits to another head, hf.py's BertModel import leaves fresh
HEAD_PREFIXES = ("lm_head.", "mlm_", "nsp_head.", "pooler.", "cls_head.")


# ----------------------------------------------------------------------------------------------
# FLOPs per token: one implementation, for train.py's MFU and bench.py (the hardware's peaks: common.py)

def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True,
                    dec_len: int | None = None) -> float:
    """Matmul FLOPs per token (2 per multiply-add), attention scores included: every Linear in the
    blocks and the heads, plus Q@K^T and P@V over the full seq_len window (as the dense kernels
    compute them). Training counts forward + backward = 3x forward. Embedding lookups are free.
    An encoder-decoder's token is any of a pair's seq_len source and dec_len (default seq_len) target
    tokens: the pair's FLOPs divided by seq_len + dec_len."""
    T = seq_len or cfg.block_size
    C, D, L = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.n_layer
    kv_linear = C * 2 * cfg.n_kv_head * D
    attn_linear = C * cfg.n_head * D + kv_linear + C * C
    mlp_linear = C * cfg.ffn_hidden * (3 if cfg.mlp in GATED else 2)
    attn_scores = 2 * cfg.n_head * D * T  # (q . k) and (p . v) per query position
    # the MLM head (transform + decoder) runs at mlm_slots(T) positions of each row's T; pooler, NSP and
    # classifier once per row
    head = {"lm": C * cfg.vocab_size,
            "mlm_nsp": (mlm_slots(T) * (C * C + C * cfg.vocab_size) + C * C + C * 2) / T,
            "classify": (C * C + C * cfg.n_labels) / T}[cfg.head]
    fwd = 2 * (L * (attn_linear + mlp_linear + attn_scores) + head)
    if cfg.n_dec_layer:  # per target token: self- and cross-attention (over the T source tokens), MLP, head; the
        # cross-attention's keys and values are per source token
        Td, Ld = dec_len or T, cfg.n_dec_layer
        dec = Ld * (2 * attn_linear - kv_linear + mlp_linear + 2 * cfg.n_head * D * (Td + T)) + head
        fwd = 2 * (T * (L * (attn_linear + mlp_linear + attn_scores) + Ld * kv_linear) + Td * dec) / (T + Td)
    return 3 * fwd if training else fwd
