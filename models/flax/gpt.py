"""gpt-tiny as a ``flax.nnx`` module: the twin of ``models/torch/gpt.py``, op for op.

Canonical layouts are JAX's (linear (in, out)), so the arrays go in and out unchanged. LayerNorm
is written out (biased variance, eps inside the square root, as torch's) and the attention is two
matmuls with a dense causal mask, as in the torch module and the spec's FLOP count.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.gpt_spec import LN_EPS, GPTSpec
from models.spec import ModelSpec


def _layernorm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias


class Block(nnx.Module):
    def __init__(self, spec: GPTSpec, i: int, params: dict[str, np.ndarray], dtype: Any):
        self.prefix = f"h{i}"
        self.heads = spec.heads
        self.dtype = dtype
        for name in ("ln1.scale", "ln1.bias", "attn.qkv.w", "attn.qkv.b", "attn.proj.w", "attn.proj.b",
                     "ln2.scale", "ln2.bias", "mlp.fc.w", "mlp.fc.b", "mlp.proj.w", "mlp.proj.b"):
            setattr(self, name.replace(".", "_"), nnx.Param(jnp.asarray(params[f"h{i}.{name}"])))

    def _mm(self, x: jax.Array, w: nnx.Param, b: nnx.Param) -> jax.Array:
        return jnp.matmul(x.astype(self.dtype), w[...].astype(self.dtype), preferred_element_type=jnp.float32) + b[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        bsz, t, d = x.shape
        hd = d // self.heads
        h = _layernorm(x, self.ln1_scale[...], self.ln1_bias[...])
        q, k, v = jnp.split(self._mm(h, self.attn_qkv_w, self.attn_qkv_b), 3, axis=-1)
        q, k, v = (z.reshape(bsz, t, self.heads, hd).transpose(0, 2, 1, 3) for z in (q, k, v))
        att = jnp.matmul(q.astype(self.dtype), k.transpose(0, 1, 3, 2).astype(self.dtype), preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        att = jax.nn.softmax(jnp.where(causal, att, -jnp.inf), axis=-1)
        y = jnp.matmul(att.astype(self.dtype), v.astype(self.dtype), preferred_element_type=jnp.float32)
        x = x + self._mm(y.transpose(0, 2, 1, 3).reshape(bsz, t, d), self.attn_proj_w, self.attn_proj_b)
        h = _layernorm(x, self.ln2_scale[...], self.ln2_bias[...])
        h = jax.nn.gelu(self._mm(h, self.mlp_fc_w, self.mlp_fc_b), approximate=True)
        return x + self._mm(h, self.mlp_proj_w, self.mlp_proj_b)


class GPT(nnx.Module):
    def __init__(self, spec: GPTSpec, params: dict[str, np.ndarray], dtype: Any = jnp.float32):
        self.dtype = dtype
        self.tok_emb = nnx.Param(jnp.asarray(params["tok_emb"]))
        self.pos_emb = nnx.Param(jnp.asarray(params["pos_emb"]))
        self.blocks = nnx.List([Block(spec, i, params, dtype) for i in range(spec.layers)])
        self.ln_f_scale = nnx.Param(jnp.asarray(params["ln_f.scale"]))
        self.ln_f_bias = nnx.Param(jnp.asarray(params["ln_f.bias"]))
        self.head_w = nnx.Param(jnp.asarray(params["head.w"]))

    def __call__(self, idx: jax.Array) -> jax.Array:
        idx = idx.astype(jnp.int32)
        x = self.tok_emb[...][idx] + self.pos_emb[...][: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        h = _layernorm(x, self.ln_f_scale[...], self.ln_f_bias[...])
        return jnp.matmul(h.astype(self.dtype), self.head_w[...].astype(self.dtype), preferred_element_type=jnp.float32)


def build(spec: ModelSpec, params: dict[str, np.ndarray], dtype: Any = jnp.float32) -> nnx.Module:
    assert isinstance(spec, GPTSpec)
    return GPT(spec, params, dtype)


def to_canonical(spec: ModelSpec, m: nnx.Module) -> dict[str, np.ndarray]:
    assert isinstance(spec, GPTSpec) and isinstance(m, GPT)
    out = {"tok_emb": m.tok_emb[...], "pos_emb": m.pos_emb[...], "ln_f.scale": m.ln_f_scale[...],
           "ln_f.bias": m.ln_f_bias[...], "head.w": m.head_w[...]}
    for i, blk in enumerate(m.blocks):
        for k in spec.param_shapes():
            if k.startswith(f"h{i}."):
                out[k] = getattr(blk, k[len(f"h{i}."):].replace(".", "_"))[...]
    return {k: np.array(out[k], dtype=np.float32) for k in spec.param_shapes()}
