"""
The whole Transformer in one file. First the decoder-only model, GPT-2 style (learned positions, LayerNorm, GELU,
tied embeddings) or LLaMA style (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied), with its fused LM loss
and a KV-cache generate(): it reads on its own, like nanoGPT's model.py. Below the divider, two small extensions:
BERT's Encoder (bidirectional, post-LN, segment embeddings, MLM + NSP or classification heads) and T5's
EncoderDecoder (relative position bias, decoder blocks with cross-attention). ModelConfig chooses, PRESETS names
the usual sizes, from_config() picks the class. Parallelism is applied from outside, per block (parallelize.py).
Shapes: B batch, T sequence (S: a source), C n_embd, H heads, Hkv key/value heads, D head dim, V vocab.
"""
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import mix_seed

# the choices of ModelConfig's fields, declared once: train.py's rules use them too
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "relative")  # relative: T5's learned bias per head for bucketed distances
HEADS = ("lm", "mlm_nsp", "classify")
ACTIVATIONS = {  # the MLP's nonlinearity; a gated one (GATED) multiplies it by a second, value projection
    "gelu": lambda h, cfg: F.gelu(h, approximate=cfg.gelu_approx), "relu": lambda h, cfg: F.relu(h),  # GPT-2, T5
    "swiglu": lambda h, cfg: F.silu(h), "geglu": lambda h, cfg: F.gelu(h, approximate=cfg.gelu_approx)}  # LLaMA, T5
GATED = ("swiglu", "geglu")


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024      # longest sequence; the size of the position table / RoPE cache
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0          # 0 means n_head (multi-head); fewer shares K/V across heads (GQA)
    n_embd: int = 768
    ffn_hidden: int = 0         # 0 means 4*C, or LLaMA's 8/3*C rounded up to multiple_of when gated
    multiple_of: int = 256
    norm: str = "layernorm"     # NORMS
    mlp: str = "gelu"           # ACTIVATIONS
    pos: str = "learned"        # POSITIONS
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # distances beyond share T5's last bucket
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    qk_norm: bool = False       # RMSNorm of each head's q and k (before RoPE): bounded attention logits
    norm_eps: float = 1e-5
    dropout: float = 0.0
    causal: bool = True         # False: bidirectional attention (the encoders)
    gelu_approx: str = "none"   # none: exact erf GELU (nanoGPT, BERT; on CPU 4x cheaper) | tanh (GPT-2, T5 v1.1)
    post_norm: bool = False     # True: BERT's post-LN, norm after each residual add and on the embeddings
    type_vocab_size: int = 0    # >0: segment (token type) embeddings added to the input, BERT's sentence A/B
    head: str = "lm"            # HEADS. lm: next-token logits | mlm_nsp: BERT pretraining | classify: n_labels
    n_labels: int = 0           # classes of the classify head, predicted from the pooled first position ([CLS])
    n_dec_layer: int = 0        # >0: an encoder-decoder (T5): n_layer encoder blocks, then n_dec_layer decoder blocks

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        for a, b in (("n_embd", "n_head"), ("n_head", "n_kv_head")):
            if getattr(self, a) % getattr(self, b):
                raise ValueError(f"{a}={getattr(self, a)} is not divisible by {b}={getattr(self, b)}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head dim, got n_embd/n_head={self.n_embd // self.n_head}")
        for key, allowed in (("norm", NORMS), ("mlp", tuple(ACTIVATIONS)), ("pos", POSITIONS),
                             ("gelu_approx", ("tanh", "none")), ("head", HEADS)):
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
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280), "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # LLaMA-style sizes for experiments and benchmarks
    "llama-50m": dict(_LLAMA, block_size=1024, n_layer=8, n_head=8, n_kv_head=4, n_embd=512),
    "llama-150m": dict(_LLAMA, block_size=2048, n_layer=16, n_head=12, n_kv_head=4, n_embd=768),
    "llama-1b": dict(_LLAMA, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                     ffn_hidden=5632),  # the TinyLlama-1.1B shape
    "llama-7b": dict(_LLAMA, block_size=4096, n_layer=32, n_head=32, n_embd=4096),  # LLaMA-2-7B
    # BERT (Devlin et al. 2018): counts equal Hugging Face BertForPreTraining with its 30,522-token vocabulary
    "bert-tiny": dict(_BERT, vocab_size=261, block_size=256, n_layer=4, n_head=4, n_embd=128),  # bytes + 4 specials
    "bert-base": dict(_BERT, n_layer=12, n_head=12, n_embd=768),     # 110,106,428 parameters
    "bert-large": dict(_BERT, n_layer=24, n_head=16, n_embd=1024),   # 336,226,108
    # T5 (Raffel et al. 2020): counts equal Hugging Face T5ForConditionalGeneration with its 32,128-token vocabulary
    "t5-tiny": dict(_T5, vocab_size=361, n_layer=4, n_dec_layer=4, n_head=4, n_embd=128),  # bytes+4+100 sentinels
    "t5-small": dict(_T5, n_layer=6, n_dec_layer=6, n_head=8, n_embd=512),     # 60,506,624 parameters
    "t5-base": dict(_T5, n_layer=12, n_dec_layer=12, n_head=12, n_embd=768),   # 222,903,552
}


def config_from_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def from_config(cfg: ModelConfig) -> "Transformer":
    """The model a config describes: an EncoderDecoder (n_dec_layer), an Encoder (a BERT head), else the decoder."""
    return EncoderDecoder(cfg) if cfg.n_dec_layer else Encoder(cfg) if cfg.head != "lm" else Transformer(cfg)


def Norm(cfg):
    C, eps = cfg.n_embd, cfg.norm_eps
    return nn.RMSNorm(C, eps=eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(C, eps=eps, bias=cfg.bias)


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


SDPA_GQA = True  # SDPA's enable_gqa (torch 2.5+): each K/V head serves its query heads without copies (False: repeat)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=cfg.bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init, see Transformer.init_tensor
        self.scale = None  # SDPA's 1/sqrt(D); T5 sets 1.0 (its q's init carries the scale)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = (nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) for _ in range(2))

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
        # SDPA broadcasts K/V over their query heads itself (no mask), so backward keeps them at their own width;
        # with a mask (KV-cache decoding, padding), repeat them to (B, H, T, D)
        native = grouped and SDPA_GQA and attn_mask is None
        if grouped and not native:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale,
                                           dropout_p=self.cfg.dropout if self.training else 0.0,
                                           **({"enable_gqa": True} if native else {}))
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.gated = cfg, cfg.mlp in GATED
        self.up = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True

    def forward(self, x):
        h = self.up(x)  # (B, T, F), or (B, T, 2F): a gated unit's gate and value halves
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            return self.down(ACTIVATIONS[self.cfg.mlp](gate, self.cfg) * value)
        return self.down(ACTIVATIONS[self.cfg.mlp](h, self.cfg))


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
    """The LM head and its mean cross-entropy over targets != -1, fused for training. The plain path keeps (N, V)
    logits, their fp32 log-softmax and, in backward, two dense fp32 gradients: ~8 GiB for GPT-2 at 12 x 1024 in bf16.
    Here forward walks the N = B*T rows in chunks of LOSS_CHUNK_BYTES of fp32 logits and, per chunk, takes the loss
    and at once its gradient w.r.t. the logits, hence w.r.t. the head's input and weight; backward only scales
    those. Nothing is recomputed: the FLOPs equal the plain path's (flops_per_token holds)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, dtype):
        # x (N, C), weight (V, C), bias (V,) or None, targets (N,); dtype: the matmuls' (autocast's, else x's)
        N, V = x.size(0), weight.size(0)
        rows = max(1, LOSS_CHUNK_BYTES // (4 * V))
        w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None  # cast once, as autocast would
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
            del z  # before the next chunk's logits exist
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


def lm_loss(head, x, targets):
    """(logits, mean cross-entropy over targets != -1) of the head nn.Linear on x (B, T, C). Training (autograd
    on): fused, the logits are never formed and come back None; otherwise the plain path returns (B, T, V)."""
    if LOSS_CHUNK_BYTES and torch.is_grad_enabled() and head.weight.requires_grad:
        dev = x.device.type  # the matmuls' dtype: what autocast would give nn.Linear
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return None, LinearCrossEntropy.apply(x.flatten(0, 1), head.weight, head.bias, targets.flatten(), dtype)
    logits = head(x)  # (B, T, V)
    return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class Transformer(nn.Module):
    """The decoder-only model: token ids (B, T) -> next-token logits (B, T, V), and the loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = Norm(cfg)  # the final norm, or with post_norm the embeddings' norm
        if cfg.pos == "relative":  # computed once per stack, shared by its blocks
            self.rel_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_head)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables are derived, not learned: non-persistent, rebuilt by init_buffers after to_empty
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if type(self) is Transformer and not self.tok_emb.weight.is_meta:  # (meta: init later, per shard; an
            self.init_weights()                                               # extension: once it is whole)

    def init_tensor(self, name, shape, seed=0, device="cpu"):
        """The initial value of parameter `name`, from a generator seeded by (seed, name): any rank
        can make the same value for any parameter, so a sharded init equals a single-process one."""
        module = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return torch.ones(shape, device=device) if name.endswith(".weight") else torch.zeros(shape, device=device)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=device)
        # GPT-2 scales the residual projections so the pre-LN stream does not grow with depth (BERT: all 0.02)
        scaled = getattr(module, "residual", False) and not self.cfg.post_norm
        return self.randn(name, shape, seed, device) * (0.02 / math.sqrt(2 * self.cfg.n_layer) if scaled else 0.02)

    @staticmethod
    def randn(name, shape, seed, device):
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, zlib.crc32(name.encode())))
        return torch.randn(shape, generator=g, device=device)

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
            embeddings = (self.tok_emb, self.pos_emb, getattr(self, "type_emb", None))
            n -= sum(e.weight.numel() for e in embeddings if e is not None)
        return n

    def embed(self, idx, pos=0):
        """Token (and learned position) embeddings of idx (B, T) at positions pos..: (B, T, C)."""
        if pos + idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + idx.size(1)} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + idx.size(1), device=idx.device))
        return x

    def hidden(self, x, attn_mask=None, cache=None, pos=0):
        """Embeddings x (B, T, C) through the blocks: (B, T, C) after the final norm. attn_mask (B, T) bool, True
        at real tokens: padding keys are never attended (bidirectional models). cache: generate()'s."""
        if self.cfg.post_norm:  # (no final norm then: each block ends with one)
            x = self.norm(x)
        x = self.drop(x)
        if attn_mask is not None:  # padding (B, T) -> (B, 1, 1, T), over the keys
            attn_mask = attn_mask[:, None, None, :]
        if self.cfg.pos == "relative":  # the bias as a float mask, padding keys -inf in it: (1 or B, H, T, pos + T)
            bias = relative_bias(self.rel_bias, x.size(1), pos, not self.cfg.causal, self.cfg)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        rope = (self.rope_cos.to(x.device), self.rope_sin.to(x.device)) if self.cfg.pos == "rope" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache[i] if cache is not None else None, pos, attn_mask)
        return x if self.cfg.post_norm else self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list | None = None,
                pos: int = 0) -> tuple:
        """idx (B, T) token ids at positions pos.., targets (B, T) the next ones (-1: ignored). Returns (logits,
        loss): logits (B, T, V), (B, 1, V) with a cache, None when training (targets given, autograd on: the
        fused loss never forms them); loss None without targets."""
        x = self.hidden(self.embed(idx, pos), cache=cache, pos=pos)
        if targets is None:
            return self.lm_head(x[:, -1:] if cache is not None else x), None
        return lm_loss(self.lm_head, x, targets)

    def new_cache(self, batch_size, device, dtype, n=None):
        """Per block (n of them): its keys and values, and an encoder-decoder's cross-attention K/V."""
        shape = (batch_size, self.cfg.n_kv_head, self.cfg.block_size, self.cfg.n_embd // self.cfg.n_head)
        return [dict(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype),
                     cross={}) for _ in range(n or self.cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 vocab: int | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens; temperature 0 is greedy. With use_cache each new token costs one
        position (a full cache is re-filled from the last block_size//2 tokens). vocab: draw only ids below it (the
        tokenizer's; rows past it pad vocab_size for speed and mean nothing)."""
        if not self.cfg.causal:
            raise ValueError("generate() needs a causal model; this one is bidirectional")
        cache, pos = None, 0
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -self.cfg.block_size:])
            elif cache is None or pos >= self.cfg.block_size:  # (re)fill the cache from the context
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


# ----------------------------------------------------------------------------------------------
# the extensions: BERT's encoder and T5's encoder-decoder. Each keeps the parameter order ORDER: the gradient
# norm sums the parameters in that order, and another order would change a run's last bits

def relative_bias(table, T, pos, bidirectional, cfg):
    """T5's position bias (1, H, T, pos + T) of queries at pos.. over keys 0..: table (buckets, H) at a bucket per
    distance, exact when small, log-spaced up to max_distance; one-way (decoder): future keys -inf (causal)."""
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


ORDER = ("tok_emb", "pos_emb", "type_emb", "drop", "blocks", "norm", "rel_bias", "dec_blocks", "dec_rel_bias",
         "dec_norm", "pooler", "mlm_dense", "mlm_norm", "nsp_head", "cls_head", "lm_head")
HEAD_PREFIXES = ("lm_head.", "mlm_", "nsp_head.", "pooler.", "cls_head.")  # what a fine-tune may swap (data.py)


class Encoder(Transformer):
    """BERT: bidirectional blocks over [CLS] A [SEP] B [SEP] with segment embeddings, and on top either MLM + NSP
    heads (pretraining, L = L_MLM + L_NSP) or a classifier, both reading the pooled first position ([CLS])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        C = cfg.n_embd
        self.type_emb = nn.Embedding(cfg.type_vocab_size, C) if cfg.type_vocab_size else None
        self.pooler = nn.Linear(C, C)  # dense + tanh over [CLS]
        if cfg.head == "mlm_nsp":
            self.mlm_dense, self.mlm_norm = nn.Linear(C, C), Norm(cfg)  # the MLM transform before the decoder
            self.nsp_head = nn.Linear(C, 2)  # IsNext (0) / NotNext (1)
            self.lm_head = nn.Linear(C, cfg.vocab_size)  # the MLM decoder, with BERT's output bias
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
        else:
            self.cls_head, self.lm_head = nn.Linear(C, cfg.n_labels), None
        self._modules = {k: self._modules[k] for k in ORDER if k in self._modules}
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    def forward(self, idx, targets=None, attn_mask=None, token_type_ids=None, labels=None) -> tuple:
        """idx (B, T); targets (B, T) the original ids at the MLM positions, -1 elsewhere; attn_mask (B, T) True at real
        tokens; token_type_ids (B, T) segments (default 0); labels (B,) NSP (0 IsNext, 1 NotNext) or class. Returns
        (logits, loss): classify (B, n_labels); mlm_nsp (mlm, nsp (B, 2)), mlm (B, T, V), or with targets (B, K, V) at
        mlm_positions(targets). loss None without targets/labels."""
        x = self.embed(idx)
        if self.type_emb is not None:
            x = x + self.type_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(idx))
        x = self.hidden(x, attn_mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C)
        if self.cfg.head == "classify":
            logits = self.cls_head(self.drop(pooled))  # (B, n_labels)
            return logits, F.cross_entropy(logits.float(), labels, ignore_index=-1) if labels is not None else None
        nsp = self.nsp_head(pooled)  # (B, 2)
        if targets is not None:  # the decoder only where there is something to predict: ~15% of positions
            pos = mlm_positions(targets)  # (B, K)
            x = x.gather(1, pos[..., None].expand(-1, -1, x.size(-1)))  # (B, K, C)
            targets = targets.gather(1, pos)  # (B, K), -1 in the filler slots
        mlm = self.lm_head(self.mlm_norm(F.gelu(self.mlm_dense(x), approximate=self.cfg.gelu_approx)))  # (B, K|T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(mlm.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            if labels is not None:
                loss = loss + F.cross_entropy(nsp.float(), labels)  # L = L_MLM + L_NSP
        return (mlm, nsp), loss


def mlm_slots(T: int) -> int:
    """K, the positions per row the MLM decoder runs at: a function of T alone, so no shape depends on the data. At
    least the most data.mask_tokens chooses (round(0.15 n) of n <= T - 3 real tokens), and one against rounding."""
    return min(T, math.ceil(0.15 * T) + 1)


def mlm_positions(targets):
    """(B, K) positions: each row's targets != -1 in order, then filler positions (their target is -1).
    topk, not boolean indexing: a fixed shape and no host sync, so one compiled graph serves every batch."""
    T = targets.size(1)
    rank = torch.arange(T, 0, -1, device=targets.device)  # earlier chosen positions score higher
    return torch.topk(torch.where(targets != -1, rank, 0), mlm_slots(T), dim=1).indices


class EncoderDecoder(Transformer):
    """T5: the blocks encode the source; decoder blocks with cross-attention to it write the target. T5's init,
    unscaled attention (the scale is in q's init) and, with tied embeddings, the head's input scaled by C^-0.5."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # the encoder, the shared embedding and the head
        self.dec_blocks = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_dec_layer))
        self.dec_rel_bias, self.dec_norm = nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_head), Norm(cfg)
        for m in self.modules():
            if isinstance(m, Attention):
                m.scale = 1.0
        self._modules = {k: self._modules[k] for k in ORDER if k in self._modules}
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    def init_tensor(self, name, shape, seed=0, device="cpu"):
        """T5's: unit embeddings, 1/sqrt(fan in) elsewhere, q also 1/sqrt(D); norms 1, biases 0."""
        module = self.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(".bias"):
            return super().init_tensor(name, shape, seed, device)
        fan_in = shape[-1] if isinstance(module, nn.Linear) else self.cfg.n_embd
        std = 1.0 if name == "tok_emb.weight" else fan_in ** -0.5
        std *= (self.cfg.n_embd // self.cfg.n_head) ** -0.5 if name.endswith(".q.weight") else 1.0
        return self.randn(name, shape, seed, device) * std

    def forward(self, idx, dec_idx, targets=None, attn_mask=None, cache=None, pos=0, memory=None) -> tuple:
        """idx (B, S) the source, attn_mask (B, S) its padding, dec_idx (B, T) the decoder's input at pos.. (start
        id, then the target shifted right), targets (B, T); memory (B, S, C), cache: generate()'s. As the decoder's."""
        if memory is None:
            memory = self.drop(self.hidden(self.embed(idx), attn_mask))
        T = dec_idx.size(1)
        if pos + T > self.cfg.block_size:
            raise ValueError(f"target of {pos + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.drop(self.tok_emb(dec_idx))
        bias = relative_bias(self.dec_rel_bias, T, pos, False, self.cfg)  # one-way: also the causal mask
        memory_mask = attn_mask[:, None, None, :] if attn_mask is not None else None  # (B, 1, 1, S)
        for i, block in enumerate(self.dec_blocks):
            x = block(x, None, cache[i] if cache is not None else None, pos, bias, memory, memory_mask)
        x = self.drop(self.dec_norm(x))
        if self.cfg.tie_embeddings:  # T5: before the tied, unit-variance embedding
            x = x * self.cfg.n_embd ** -0.5
        if targets is None:
            return self.lm_head(x[:, -1:] if cache is not None else x), None
        return lm_loss(self.lm_head, x, targets)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None,
                 attn_mask=None, start_id=None, stop_id=None, vocab=None) -> torch.Tensor:
        """The target (B, n) for the source idx (B, S) (attn_mask: its padding): the encoder runs once, the decoder
        from start_id (not returned) a token at a time, its cache also holding cross-attention's K/V. With
        stop_id, a row that has produced it repeats it; n < max_new_tokens when all have."""
        if start_id is None:
            raise ValueError("an encoder-decoder's decoder starts from start_id: pass the one it was trained with")
        B = idx.size(0)
        out = torch.full((B, 1), start_id, dtype=torch.long, device=idx.device)
        memory = self.hidden(self.embed(idx), attn_mask)
        cache = self.new_cache(B, idx.device, memory.dtype, self.cfg.n_dec_layer) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for t in range(max_new_tokens):  # cached: the newest token alone, at position t
            step = dict(dec_idx=out[:, -1:], cache=cache, pos=t) if use_cache else dict(dec_idx=out)
            logits, _ = self(idx, attn_mask=attn_mask, memory=memory, **step)
            nxt = sample_next(logits[:, -1, :vocab].float(), temperature, top_k, top_p, generator)  # (B, 1)
            if stop_id is not None:
                nxt = nxt.masked_fill(done[:, None], stop_id)
                done |= nxt[:, 0] == stop_id
            out = torch.cat((out, nxt), dim=1)
            if done.all():
                break
        return out[:, 1:]
