"""A small transformer language model in ``flax.nnx``, trained data parallel by podscale on
*Alice's Adventures in Wonderland* (``examples/data``, public domain), one byte per token.

    podscale run examples/flax_lm.py --backend jax-sharded --devices 4 --global-batch 32 --steps 300 --lr 3e-3
    podscale run examples/flax_lm.py --backend jax-pmap --devices 4 --processes 2 --global-batch 32 --steps 300

Next-token cross-entropy; the result JSON holds ``final_loss`` beside ``unigram_entropy`` (the
loss of the best model that ignores context): a model that learned anything ends below it.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import podscale.jax as ps
from chars import VOCAB, unigram_entropy, windows


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class ByteLM(nnx.Module):
    def __init__(self, seq_len: int, d: int, heads: int, layers: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq_len, d)) * 0.02)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        x = self.embed(tokens) + self.pos[...][:t]
        mask = nnx.make_causal_mask(tokens)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def loss_fn(model: ByteLM, batch: dict) -> jax.Array:
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"]).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()

    run = ps.init()
    x, y = windows(args.seq_len)
    model = ByteLM(args.seq_len, args.d_model, args.heads, args.layers, nnx.Rngs(run.config.seed))
    out = ps.fit(model, optax.adam(run.config.lr), loss_fn, {"x": x, "y": y}, shuffle=True)
    h = unigram_entropy()
    ps.report(unigram_entropy=h, final_loss=out["losses"][-1])
    if run.is_main:
        print(f"loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f} nats/byte (unigram entropy {h:.3f})")


if __name__ == "__main__":
    main()
