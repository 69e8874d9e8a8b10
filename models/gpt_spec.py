"""gpt-tiny: a decoder-only transformer (pre-LayerNorm, GELU MLP, untied head, no dropout).

A sample is one sequence of ``seq_len`` token ids; the target is the same sequence shifted by one
(next-token prediction), so the model's output is (seq_len, vocab) logits and the loss is
cross-entropy over every position: ``task = "classification"`` with the leading axes flattened
(``mean`` = mean over all tokens of the global batch, ``sum`` = their sum). No dropout, so torch
and JAX runs are comparable step by step.

FLOPs (2 per multiply-add), per sequence of T tokens, L layers, width d, vocab V:
  matmuls with weights  2·T·(12·L·d² + d·V)      (qkv 3d², out-proj d², MLP 8d², head d·V)
  attention             4·L·T²·d                  (QKᵀ and A·V, the full T×T square: the causal mask
                                                   is applied to a dense product, as the kernels run it)
  backward = 2 x forward for all of them (the embedding lookup is the first layer and has no FLOPs),
so train FLOPs per token = 6·(12·L·d² + d·V) + 12·L·T·d — PaLM's 6·N + 12·L·d·T with N = the matmul
weights (biases and LayerNorm parameters are elementwise work and not in N; embeddings are lookups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.spec import SPECS, LayerCost, ModelSpec
from models.errors import UsageError

LN_EPS = 1e-5


@dataclass(frozen=True)
class GPTSpec(ModelSpec):
    name: ClassVar[str] = "gpt-tiny"
    task: ClassVar[str] = "classification"
    vocab: int = 256
    seq_len: int = 64
    layers: int = 2
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        self.require_positive("vocab", "seq_len", "layers", "d_model", "heads", "mlp_ratio")
        if self.d_model % self.heads:
            raise UsageError(f"invalid --model-opt heads={self.heads} for model 'gpt-tiny': must divide d_model={self.d_model}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def output_dim(self) -> int:
        return self.vocab

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.d_model, self.d_model * self.mlp_ratio
        s: dict[str, tuple[int, ...]] = {"tok_emb": (self.vocab, d), "pos_emb": (self.seq_len, d)}
        for i in range(self.layers):
            p = f"h{i}"
            s |= {f"{p}.ln1.scale": (d,), f"{p}.ln1.bias": (d,),
                  f"{p}.attn.qkv.w": (d, 3 * d), f"{p}.attn.qkv.b": (3 * d,),
                  f"{p}.attn.proj.w": (d, d), f"{p}.attn.proj.b": (d,),
                  f"{p}.ln2.scale": (d,), f"{p}.ln2.bias": (d,),
                  f"{p}.mlp.fc.w": (d, f), f"{p}.mlp.fc.b": (f,),
                  f"{p}.mlp.proj.w": (f, d), f"{p}.mlp.proj.b": (d,)}
        s |= {"ln_f.scale": (d,), "ln_f.bias": (d,), "head.w": (d, self.vocab)}
        return s

    @property
    def matmul_params(self) -> int:
        """N in 6·N: weights of the matmuls (not embeddings, biases or LayerNorm)."""
        d = self.d_model
        return self.layers * (4 + 2 * self.mlp_ratio) * d * d + d * self.vocab

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        """GPT-2's: N(0, 0.02) weights and embeddings, residual projections / sqrt(2L), zero biases."""
        rng = np.random.default_rng([seed, 0])
        out: dict[str, np.ndarray] = {}
        resid = 0.02 / math.sqrt(2 * self.layers)
        for k, shape in self.param_shapes().items():
            if k.endswith(".scale"):
                out[k] = np.ones(shape, np.float32)
            elif k.endswith(".bias") or k.endswith(".b"):
                out[k] = np.zeros(shape, np.float32)
            else:
                std = resid if k.endswith("proj.w") else 0.02
                out[k] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
        return out

    def layer_costs(self) -> list[LayerCost]:
        T, d, V, H = self.seq_len, self.d_model, self.vocab, self.heads
        f = d * self.mlp_ratio

        def mm(name: str, kind: str, m: int, k: int, n: int, params: int, acts: int, ew: int = 0, act: str = "") -> LayerCost:
            fwd = 2 * m * k * n
            return LayerCost(name, kind, params, fwd, 2 * fwd, acts, elementwise=ew, activation=act,
                             activation_elems=m * n if act else 0, gemm=(m, k, n))

        costs = [LayerCost("embed", "embedding", (V + T) * d, 0, 0, T * d, elementwise=T * d)]
        for i in range(self.layers):
            p = f"h{i}"
            costs += [
                LayerCost(f"{p}.ln1", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d),
                mm(f"{p}.attn.qkv", "dense", T, d, 3 * d, 3 * d * d + 3 * d, 3 * T * d, 3 * T * d),
                mm(f"{p}.attn.scores", "attention", H * T, self.head_dim, T, 0, H * T * T, 5 * H * T * T, act="softmax"),
                mm(f"{p}.attn.av", "attention", H * T, T, self.head_dim, 0, T * d),
                mm(f"{p}.attn.proj", "dense", T, d, d, d * d + d, T * d, 2 * T * d),
                LayerCost(f"{p}.ln2", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d),
                mm(f"{p}.mlp.fc", "dense", T, d, f, d * f + f, 2 * T * f, 9 * T * f, act="gelu"),
                mm(f"{p}.mlp.proj", "dense", T, f, d, f * d + d, T * d, 2 * T * d),
            ]
        costs += [LayerCost("ln_f", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d),
                  mm("head", "dense", T, d, V, d * V, T * V)]
        return costs

    def synthetic_data(self, n: int, seed: int, teacher: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Arithmetic token sequences (start a, stride b, mod vocab): random, yet learnable in context
        (``teacher=False``: uniformly random tokens, nothing to learn).

        x = tokens 0..T-1, y = tokens 1..T (the next token at every position), both int64.
        """
        rng = np.random.default_rng([seed, 1])
        if not teacher:
            seq = rng.integers(0, self.vocab, size=(n, self.seq_len + 1))
            return np.ascontiguousarray(seq[:, :-1].astype(np.int64)), np.ascontiguousarray(seq[:, 1:].astype(np.int64))
        a = rng.integers(0, self.vocab, size=(n, 1))
        b = rng.integers(1, max(2, min(self.vocab, 8)), size=(n, 1))
        seq = (a + b * np.arange(self.seq_len + 1)[None, :]) % self.vocab
        return np.ascontiguousarray(seq[:, :-1].astype(np.int64)), np.ascontiguousarray(seq[:, 1:].astype(np.int64))


SPECS["gpt-tiny"] = GPTSpec
