"""A Hugging Face ``transformers`` GPT-2, trained unchanged by podscale: a character-level language
model of *Alice's Adventures in Wonderland* (``examples/data``, public domain).

    podscale run examples/hf_gpt2.py --backend torch-ddp --devices 2 --global-batch 16 --steps 100 --lr 3e-3 \\
        --optimizer adam -- --layers 2 --d-model 64

The model is ``transformers.GPT2LMHeadModel`` built from a small ``GPT2Config`` (random init: no
weights are downloaded), exactly as the library ships it; podscale wraps it in DDP, meters it and
counts its FLOPs from its first step. Its output object's ``logits`` feed a next-byte cross-entropy.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import podscale.torch as ps
from chars import VOCAB, unigram_entropy, windows


class NextByteLoss(nn.Module):
    """Cross-entropy of GPT-2's logits against the next byte at every position."""

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()

    hf_logging.set_verbosity_error()
    run = ps.init()
    x, y = windows(args.seq_len)
    config = GPT2Config(vocab_size=VOCAB, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.Adam(model.parameters(), lr=run.config.lr)
    out = ps.fit(model, opt, NextByteLoss(), (x.astype("int64"), y.astype("int64")), shuffle=True)
    ps.report(unigram_entropy=unigram_entropy())
    if run.is_main:
        print(f"loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f} nats/byte (unigram entropy {unigram_entropy():.3f})")


if __name__ == "__main__":
    main()
