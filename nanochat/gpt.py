"""
The GPT model, nanochat's architecture:
- rotary position embeddings, no learned positions
- QK norm; parameter-free RMSNorm everywhere
- relu^2 MLP; no biases in any linear layer
- untied token embedding and lm_head
- logit softcap
- optional grouped-query attention (n_kv_head < n_head)
Sizes derive from depth: width = 64 * depth (nanochat's aspect ratio).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int,
                   head_dim: int | None = None, n_kv_head: int | None = None) -> "GPTConfig":
        """nanochat's recipe: width = 64 * depth. Heads of 128 as nanochat uses on GPUs for wide models;
        heads of 64 for the narrow models that run on a CPU (width < 1024), so they keep several heads."""
        n_embd = depth * 64
        if head_dim is None:
            head_dim = 128 if n_embd >= 1024 else 64
        n_head = max(1, n_embd // head_dim)
        n_kv = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head or n_head % n_kv:
            raise ValueError(f"bad shape: n_embd={n_embd} n_head={n_head} n_kv_head={n_kv}")
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_kv, n_embd=n_embd)

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm, in x's own dtype. Outside autocast on purpose: from torch 2.12 CUDA
    autocast runs rms_norm in fp32, which made the residual stream an fp32 copy at every norm and
    handed FlexAttention fp32 q/k next to a bf16 v. rms_norm accumulates in fp32 inside anyway."""
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),))


def activation_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the forward computes in: autocast's where autocast is on for the weights' device
    (bf16 training on CUDA), else the weights' own (fp32 training, bf16 or fp32 inference). The
    embedding output and the rotary tables are cast to it, so the residual stream, q, k and v all
    carry it and no fp32 copy of an activation is made; the fp32 master weights stay as they are."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin: (1, T, 1, D/2)
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)  # a no-op when cos/sin carry x's dtype (GPT.forward casts them)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) boolean mask: causal, and no attention across documents.
    Used for packed SFT rows; padding shares one id so no row of the mask is empty."""
    T = doc_ids.size(1)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal).unsqueeze(1)


# Packed rows (doc_ids) can be attended two ways. "sdpa": scaled_dot_product_attention with the dense
# (B, 1, T, T) mask above; a dense mask rules out the flash kernels, and every masked block is still
# computed. "flex": FlexAttention with a block mask built from the same document ids; its compiled
# kernels skip the blocks that lie wholly across documents or above the diagonal. FlexAttention has no
# backward on CPU (torch 2.13: "FlexAttention does not support backward on CPU"), so "auto" takes flex
# on CUDA and sdpa elsewhere; both compute the same function (tests/test_packing.py).
DOC_ATTENTION_CHOICES = ("auto", "sdpa", "flex")


def doc_attention_route(choice: str, device: torch.device) -> str:
    """The attention used for packed rows on `device`: "flex" or "sdpa"."""
    if choice not in DOC_ATTENTION_CHOICES:
        raise ValueError(f"doc attention {choice!r}: choose one of {', '.join(DOC_ATTENTION_CHOICES)}")
    if choice == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return choice


def document_block_mask(doc_ids: torch.Tensor):
    """(B, T) document ids -> FlexAttention BlockMask with the mask of document_causal_mask()."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = doc_ids.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


_compiled_flex = None


def flex_attention(q, k, v, block_mask, enable_gqa: bool = False):
    """FlexAttention, compiled on CUDA: called uncompiled it materialises the whole score matrix. Inside
    a torch.compile'd model the plain function is traced into the model's graph instead. Off CUDA (only
    tests take flex there: it has no backward on CPU) the unfused reference, without a compilation."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex
    if torch.compiler.is_compiling():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if q.device.type != "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile()": intended here
            return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)  # QK norm; the attention kernels take one dtype
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        enable_gqa = self.n_head != self.n_kv_head
        if kv_cache is not None:
            # The cache stores k, v and returns everything attended to so far, plus the mask to use.
            k, v, cache_mask = kv_cache.insert_kv(self.layer_idx, k, v)
            if cache_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=(q.size(2) == k.size(2)), enable_gqa=enable_gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, enable_gqa=enable_gqa)
        elif attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a FlexAttention BlockMask
            y = flex_attention(q, k, v, attn_mask, enable_gqa=enable_gqa)
        elif attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None, attn_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, attn_mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    softcap = 15.0
    doc_attention = "auto"  # attention for packed rows (doc_ids): auto | sdpa | flex, see doc_attention_route()

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training length so generation can run past it.
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self) -> "GPT":
        """nanochat's init: zero output projections and a tiny lm_head, so every block starts as
        the identity and the first loss is close to ln(vocab)."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                torch.nn.init.normal_(lin.weight, mean=0.0, std=std)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim, device=self.cos.device)
        self.cos, self.sin = cos, sin
        return self

    @staticmethod
    def _precompute_rotary(seq_len, head_dim, base=10000, device=None):
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 x (params - embedding) for the matmuls, plus attention's
        12 * layers * heads * head_dim * seq_len (forward QK^T and AV, times 3 for backward)."""
        nparams = self.num_params()
        nparams_embedding = self.transformer.wte.weight.numel()
        c = self.config
        l, h, q, t = c.n_layer, c.n_head, c.n_embd // c.n_head, c.sequence_len
        return 6 * (nparams - nparams_embedding) + 12 * l * h * q * t

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", doc_ids=None, pos_offset=None,
                compiled: "CompiledGPT | None" = None):
        """idx: (B, T) token ids. targets: (B, T) with -1 where no loss is taken.
        doc_ids: (B, T) for packed rows (attention stays within a document).
        kv_cache: an object with insert_kv(layer, k, v) -> (k, v, mask) and a position (see engine.py).
        compiled: the CompiledGPT whose regions run the blocks, the head and the mask (it passes itself).
        Returns the loss when targets are given, else logits (B, T, vocab) in float32."""
        if compiled is not None and kv_cache is not None:
            raise ValueError("the compiled training forward takes no kv_cache")
        B, T = idx.size()
        if kv_cache is not None:
            cos, sin = kv_cache.rotary(self.cos, self.sin, T)
        else:
            start = 0 if pos_offset is None else pos_offset
            if start + T > self.cos.size(1):
                raise ValueError(f"sequence of {start + T} tokens is longer than the rotary table ({self.cos.size(1)})")
            cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]
        dtype = activation_dtype(self.transformer.wte.weight)
        cos_sin = (cos.to(dtype), sin.to(dtype))
        attn_mask = None
        if doc_ids is not None:
            attn_mask = (GPT.doc_mask if compiled is None else compiled.doc_mask)(self, doc_ids)
        x = self.transformer.wte(idx).to(dtype)  # the rows looked up, cast: never the whole table
        x = norm(x)
        for block in self.transformer.h:
            if compiled is None:
                x = block(x, cos_sin, kv_cache, attn_mask)
            else:
                x = compiled.block(block, x, cos_sin, None, attn_mask)
        return (GPT.head if compiled is None else compiled.head)(self, x, targets, loss_reduction)

    def doc_mask(self, doc_ids: torch.Tensor):
        """The attention mask of packed rows: a FlexAttention BlockMask or the dense boolean mask."""
        if doc_attention_route(self.doc_attention, doc_ids.device) == "flex":
            return document_block_mask(doc_ids)
        return document_causal_mask(doc_ids)

    def head(self, x: torch.Tensor, targets=None, loss_reduction: str = "mean") -> torch.Tensor:
        """Final norm, lm_head, softcap; the loss when targets are given, else the float32 logits."""
        x = norm(x)
        logits = self.lm_head(x).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)


# The training forward, torch.compile'd by region. Tests may set another backend (aot_eager: dynamo and
# AOTAutograd build the same regions and autograd graph, without inductor's code generation).
COMPILE_BACKEND = "inductor"


class CompiledGPT(nn.Module):
    """A GPT's training forward with each region torch.compile'd on its own, by default dynamic=False
    (SFT's shapes are fixed; base training passes None so the probe's trial sizes share a graph): one graph
    serves every block (the same code and shapes), one the head (norm, lm_head, softcap, cross-entropy),
    one the packed rows' attention mask. Why not the whole model: its backward would be one autograd
    node, so every gradient would be ready only once all of backward had run, and GradientBuckets'
    all-reduces could not start before it ended. By region, the autograd engine accumulates a block's
    gradients as soon as that block's backward is done, and their bucket is all-reduced while the
    earlier blocks' backward runs (DDP gets the same by splitting dynamo's graph at its buckets).
    One block's compile serving all blocks also keeps the compile short at any depth.
    Called like the model for training (no kv_cache); `model` stays the uncompiled module (eval, checkpoints)."""

    def __init__(self, model: GPT, backend=None, dynamic: bool | None = False):
        super().__init__()
        compile_region = functools.partial(torch.compile, dynamic=dynamic, backend=backend or COMPILE_BACKEND)
        self.model = model
        self.block = compile_region(Block.forward)
        self.head = compile_region(GPT.head)
        self.doc_mask = compile_region(GPT.doc_mask)

    def forward(self, idx, targets=None, loss_reduction="mean", doc_ids=None):
        return self.model(idx, targets, loss_reduction=loss_reduction, doc_ids=doc_ids, compiled=self)


def build_model(config: GPTConfig, device: torch.device | str = "cpu") -> GPT:
    """Build on the meta device, then materialize on `device` and initialize (no double init cost)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
