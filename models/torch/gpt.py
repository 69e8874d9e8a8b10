"""gpt-tiny in torch: pre-LayerNorm decoder blocks, explicit attention matmuls, untied head.

Attention is written as two matmuls (not ``scaled_dot_product_attention``) so that the Flax twin
computes the same numbers in the same order and the FLOP counters see what the spec counts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.gpt_spec import LN_EPS, GPTSpec
from models.spec import ModelSpec


class Block(nn.Module):
    def __init__(self, d: int, heads: int, f: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, eps=LN_EPS)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=LN_EPS)
        self.fc = nn.Linear(d, f)
        self.fc_proj = nn.Linear(f, d)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        d = spec.d_model
        self.tok_emb = nn.Embedding(spec.vocab, d)
        self.pos_emb = nn.Parameter(torch.zeros(spec.seq_len, d))
        self.blocks = nn.ModuleList(Block(d, spec.heads, d * spec.mlp_ratio) for _ in range(spec.layers))
        self.ln_f = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, spec.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx.long()) + self.pos_emb[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def _pairs(spec: GPTSpec, m: GPT) -> list[tuple[str, torch.Tensor, bool]]:
    """(canonical name, torch tensor, transposed?) for every parameter."""
    out: list[tuple[str, torch.Tensor, bool]] = [("tok_emb", m.tok_emb.weight, False), ("pos_emb", m.pos_emb, False)]
    for i, b in enumerate(m.blocks):
        p = f"h{i}"
        out += [(f"{p}.ln1.scale", b.ln1.weight, False), (f"{p}.ln1.bias", b.ln1.bias, False),
                (f"{p}.attn.qkv.w", b.qkv.weight, True), (f"{p}.attn.qkv.b", b.qkv.bias, False),
                (f"{p}.attn.proj.w", b.proj.weight, True), (f"{p}.attn.proj.b", b.proj.bias, False),
                (f"{p}.ln2.scale", b.ln2.weight, False), (f"{p}.ln2.bias", b.ln2.bias, False),
                (f"{p}.mlp.fc.w", b.fc.weight, True), (f"{p}.mlp.fc.b", b.fc.bias, False),
                (f"{p}.mlp.proj.w", b.fc_proj.weight, True), (f"{p}.mlp.proj.b", b.fc_proj.bias, False)]
    out += [("ln_f.scale", m.ln_f.weight, False), ("ln_f.bias", m.ln_f.bias, False), ("head.w", m.head.weight, True)]
    return out


def build_gpt(spec: ModelSpec, params: dict[str, np.ndarray]) -> nn.Module:
    assert isinstance(spec, GPTSpec)
    m = GPT(spec)
    with torch.no_grad():
        for name, tensor, tr in _pairs(spec, m):
            a = params[name].T if tr else params[name]
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(a)))
    return m


def gpt_to_canonical(spec: ModelSpec, m: nn.Module) -> dict[str, np.ndarray]:
    assert isinstance(spec, GPTSpec) and isinstance(m, GPT)
    out = {}
    for name, tensor, tr in _pairs(spec, m):
        a = tensor.detach().cpu().float().numpy()
        out[name] = (a.T if tr else a).copy()
    return {k: out[k] for k in spec.param_shapes()}
