"""
The whole Transformer in one file: GPT-2 style (learned positions, LayerNorm, GELU, tied
embeddings), LLaMA style (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied) and BERT style
(bidirectional, post-LN, segment embeddings, MLM + NSP or classification heads), chosen by
ModelConfig fields, plus a table of named presets. This file knows nothing about parallelism:
train.py applies DDP/FSDP, compile and activation checkpointing from outside, per block.

Shapes: B batch, T sequence, C n_embd, H heads, Hkv key/value heads, D head dim, V vocab.
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
    ffn_hidden: int = 0         # 0 means 4*C for gelu, LLaMA's 8/3*C rounded up to multiple_of for swiglu
    multiple_of: int = 256
    norm: str = "layernorm"     # layernorm | rmsnorm
    mlp: str = "gelu"           # gelu | swiglu
    pos: str = "learned"        # learned | rope
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    dropout: float = 0.0
    causal: bool = True         # False: bidirectional attention (the BERT path)
    gelu_approx: str = "tanh"   # tanh (GPT-2) | none (exact erf GELU, BERT)
    post_norm: bool = False     # True: BERT's post-LN, norm after each residual add and on the embeddings, none at the end
    type_vocab_size: int = 0    # >0: segment (token type) embeddings added to the input, BERT's sentence A/B
    head: str = "lm"            # lm: next-token logits | mlm_nsp: BERT pretraining | classify: n_labels classes
    n_labels: int = 0           # classes of the classify head, predicted from the pooled first position ([CLS])

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                             f"n_kv_head must divide n_head")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head dim, got n_embd/n_head={self.n_embd // self.n_head}")
        for key, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                             ("pos", ("learned", "rope")), ("gelu_approx", ("tanh", "none")),
                             ("head", ("lm", "mlm_nsp", "classify"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        if self.head != "lm" and self.causal:
            raise ValueError(f"head={self.head!r} reads the whole sequence from position 0; it needs causal=False")
        if self.head == "classify" and self.n_labels < 2:
            raise ValueError(f"head='classify' needs n_labels >= 2, got {self.n_labels}")
        if not self.ffn_hidden:
            if self.mlp == "gelu":
                self.ffn_hidden = 4 * self.n_embd
            else:
                h = int(2 * 4 * self.n_embd / 3)
                self.ffn_hidden = self.multiple_of * math.ceil(h / self.multiple_of)


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False, bias=False, vocab_size=32000)
_BERT = dict(causal=False, post_norm=True, gelu_approx="none", norm_eps=1e-12, type_vocab_size=2, head="mlm_nsp",
             vocab_size=30522, block_size=512)
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

    def forward(self, x, rope=None, cache=None, pos=0, attn_mask=None):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, Hkv, T, D)
        if rope is not None:
            cos, sin = rope[0][pos:pos + T], rope[1][pos:pos + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # KV cache for generation: write this chunk, attend over all so far
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                           dropout_p=self.cfg.dropout if self.training else 0.0,
                                           **({"enable_gqa": True} if native else {}))
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu, self.gelu_approx = cfg.mlp == "swiglu", cfg.gelu_approx
        self.up = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True

    def forward(self, x):
        h = self.up(x)  # (B, T, F) or (B, T, 2F) for SwiGLU's gate and value halves
        if self.swiglu:
            gate, val = h.chunk(2, dim=-1)
            h = F.silu(gate) * val
        else:
            h = F.gelu(h, approximate=self.gelu_approx)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = Norm(cfg), Attention(cfg)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.post_norm

    def forward(self, x, rope=None, cache=None, pos=0, attn_mask=None):
        if self.post_norm:  # BERT: normalise the sum, so the residual stream itself is normalised
            x = self.norm1(x + self.drop(self.attn(x, rope, cache, pos, attn_mask)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, pos, attn_mask))
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
        # GPT-2 scales the residual projections down so that the pre-LN residual stream does not grow with
        # depth; post-LN renormalises every sum, and BERT draws everything with 0.02
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
                labels: torch.Tensor | None = None) -> tuple:
        """idx (B, T) token ids. targets (B, T): next tokens (head lm) or the original ids at the positions
        chosen for MLM, -1 elsewhere (ignored). attn_mask (B, T) bool, True at real tokens: padding keys are
        never attended. token_type_ids (B, T) segment ids. labels (B,): NSP (0 IsNext, 1 NotNext) or class.
        Returns (logits, loss); loss is None without targets/labels. Logits by head: lm (B, T, V) (B, 1, V with
        a cache), but None when targets are given while autograd records (training: the fused LinearCrossEntropy
        never forms them; under no_grad, evaluation, they are returned); mlm_nsp (mlm (B, T, V) without targets;
        with targets (B, K, V) at mlm_positions(targets), K = mlm_slots(T): each row's chosen positions in order,
        then filler slots whose target is -1; a row may choose at most K positions (data.mask_tokens never
        chooses more): more would leave the loss; nsp (B, 2)); classify (B, n_labels)."""
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
        rope = (self.rope_cos.to(x.device), self.rope_sin.to(x.device)) if self.cfg.pos == "rope" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache[i] if cache is not None else None, pos, attn_mask)
        if not self.cfg.post_norm:
            x = self.norm(x)
        if self.cfg.head != "lm":
            return self.encoder_heads(x, targets, labels)
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
        shape = (batch_size, self.cfg.n_kv_head, self.cfg.block_size, self.cfg.n_embd // self.cfg.n_head)
        return [dict(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(self.cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 vocab: int | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens. temperature=0 is greedy. With use_cache, keys and values
        are kept per layer so each new token costs one position; when the cache is full the window is
        re-filled from the last block_size//2 tokens. vocab: draw only ids below it (the tokenizer's; the
        rows past it pad vocab_size for speed and mean nothing)."""
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


# ----------------------------------------------------------------------------------------------
# Metrics per head, and fitting a pretrained encoder to another head (fine-tuning)

METRICS = {"lm": ("loss",), "mlm_nsp": ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"), "classify": ("loss", "acc")}
HEAD_PREFIXES = ("lm_head.", "mlm_", "nsp_head.", "pooler.", "cls_head.")


@torch.no_grad()
def metric_sums(head, logits, loss, batch):
    """(sum, count) of each METRICS[head] entry over one batch, flattened to a float64 vector: sums add up
    across micro-batches, evaluation batches and ranks (one all_reduce), and metrics_from_sums() divides at the end."""
    if head == "lm":
        n = (batch["targets"] != -1).sum()
        return torch.stack([loss.detach().double() * n, n.double()])
    def ce_acc(lg, y):  # summed cross-entropy, correct predictions and count over the labels != -1
        lg, y = lg.float().flatten(0, -2), y.flatten()  # masked sums, not lg[y != -1]: fixed shapes, no sync
        n = (y != -1).sum()
        ce = F.cross_entropy(lg, y, ignore_index=-1, reduction="none")  # 0 where y == -1
        return [ce.sum(), n, (lg.argmax(-1) == y).sum(), n]  # argmax is never -1
    if head == "classify":
        parts = ce_acc(logits, batch["labels"])
    else:  # the MLM logits are at mlm_positions: gather the targets the same way
        t = batch["targets"]
        parts = ce_acc(logits[0], t.gather(1, mlm_positions(t))) + ce_acc(logits[1], batch["labels"])
    return torch.stack([v.double() for v in parts])


def metrics_from_sums(head, sums):
    """{name: mean} from metric_sums vectors added up; "loss" is the total (for mlm_nsp L_MLM + L_NSP)."""
    sums = sums.tolist() if torch.is_tensor(sums) else sums  # train.py reads them to the host itself
    out = {name: sums[2 * i] / max(sums[2 * i + 1], 1) for i, name in enumerate(METRICS[head])}
    out["loss"] = sum(v for k, v in out.items() if k.endswith("loss"))
    return out


def adapt_heads(state, model, seed=0):
    """A checkpoint's state dict made to fit `model` when only the heads differ (an MLM+NSP encoder
    fine-tuned as a classifier): head weights the model lacks are dropped, heads the checkpoint lacks get
    their fresh init. Everything else is left as it is, for the strict check that follows."""
    own = model.state_dict()
    out = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    for k, v in own.items():
        if k not in state and k.startswith(HEAD_PREFIXES):
            out[k] = model.init_tensor(k, v.shape, seed)
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs per token: one implementation, for train.py's MFU and bench.py (the hardware's peaks: common.py)

def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs per token (2 per multiply-add), attention scores included: every Linear in the
    blocks and the heads, plus Q@K^T and P@V over the full seq_len window (as the dense kernels
    compute them). Training counts forward + backward = 3x forward. Embedding lookups are free."""
    T = seq_len or cfg.block_size
    C, D, L = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.n_layer
    attn_linear = C * cfg.n_head * D + C * 2 * cfg.n_kv_head * D + C * C
    mlp_linear = C * cfg.ffn_hidden * (3 if cfg.mlp == "swiglu" else 2)
    attn_scores = 2 * cfg.n_head * D * T  # (q . k) and (p . v) per query position
    # the MLM head (transform + decoder) runs at mlm_slots(T) positions of each row's T; pooler, NSP and
    # classifier once per row
    head = {"lm": C * cfg.vocab_size,
            "mlm_nsp": (mlm_slots(T) * (C * C + C * cfg.vocab_size) + C * C + C * 2) / T,
            "classify": (C * C + C * cfg.n_labels) / T}[cfg.head]
    fwd = 2 * (L * (attn_linear + mlp_linear + attn_scores) + head)
    return 3 * fwd if training else fwd
