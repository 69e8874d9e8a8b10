"""Workloads users predict by their published names: BERT-base/large, GPT-2 and GPT-3 sizes,
ResNet v1 and ResNet-101: framework-free specs with exact FLOPs, for ``podscale predict``.

They are not in the runnable zoo (``SPECS``): nothing here is built as a torch or Flax module.

BERT (Devlin et al. 2019, arXiv:1810.04805): post-LayerNorm encoder, GELU MLP of 4d, learned token,
position and segment embeddings, the MLM head (dense d x d + GELU + LayerNorm, then the decoder d x V
tied to the token embedding, plus a bias) over every position. FLOPs per sequence of T tokens
(2 per multiply-add): ``2T(12 L d^2) + 4 L T^2 d`` in the encoder plus ``2T(d^2 + d V)`` in the head,
backward = 2 x forward. BERT-base: L 12, d 768, 12 heads (110M parameters); large: 24, 1024, 16 (340M).

GPT-2 (Radford et al. 2019): vocab 50257, context 1024; sizes 124M/355M/774M/1.5B as
L x d = 12x768, 24x1024, 36x1280, 48x1600. GPT-3 (Brown et al. 2020, arXiv:2005.14165, Table 2.1):
context 2048; the spec uses ``models.gpt_spec.GPTSpec`` (untied head: FLOPs as published, parameters
count the head once more than GPT-2's tied embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from models.cnn_spec import ResNetSpec
from models.errors import UsageError
from models.gpt_spec import GPTSpec
from models.spec import LayerCost, ModelSpec


@dataclass(frozen=True)
class BERTSpec(ModelSpec):
    name: ClassVar[str] = "bert"
    task: ClassVar[str] = "classification"
    vocab: int = 30522
    seq_len: int = 128
    layers: int = 12
    d_model: int = 768
    heads: int = 12
    max_positions: int = 512

    def __post_init__(self) -> None:
        self.require_positive("vocab", "seq_len", "layers", "d_model", "heads", "max_positions")
        if self.d_model % self.heads:
            raise UsageError(f"invalid --model-opt heads={self.heads} for model 'bert': must divide d_model={self.d_model}")
        if self.seq_len > self.max_positions:
            raise UsageError(f"invalid --model-opt seq_len={self.seq_len} for model 'bert': at most {self.max_positions}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def output_dim(self) -> int:
        return self.vocab

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.d_model, 4 * self.d_model
        s: dict[str, tuple[int, ...]] = {"tok_emb": (self.vocab, d), "pos_emb": (self.max_positions, d), "seg_emb": (2, d),
                                         "emb_ln.scale": (d,), "emb_ln.bias": (d,)}
        for i in range(self.layers):
            p = f"l{i}"
            s |= {f"{p}.qkv.w": (d, 3 * d), f"{p}.qkv.b": (3 * d,), f"{p}.proj.w": (d, d), f"{p}.proj.b": (d,),
                  f"{p}.ln1.scale": (d,), f"{p}.ln1.bias": (d,), f"{p}.fc.w": (d, f), f"{p}.fc.b": (f,),
                  f"{p}.out.w": (f, d), f"{p}.out.b": (d,), f"{p}.ln2.scale": (d,), f"{p}.ln2.bias": (d,)}
        s |= {"pooler.w": (d, d), "pooler.b": (d,), "mlm.dense.w": (d, d), "mlm.dense.b": (d,),
              "mlm.ln.scale": (d,), "mlm.ln.bias": (d,), "mlm.decoder.b": (self.vocab,)}
        return s  # the decoder weight is tok_emb (tied)

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 2])
        return {k: (np.ones(v, np.float32) if k.endswith(".scale") else np.zeros(v, np.float32) if k.endswith(("b", ".bias"))
                    else (rng.standard_normal(v, dtype=np.float32) * np.float32(0.02))) for k, v in self.param_shapes().items()}

    def layer_costs(self) -> list[LayerCost]:
        T, d, V, H = self.seq_len, self.d_model, self.vocab, self.heads
        f, hd = 4 * d, d // H

        def mm(name: str, kind: str, m: int, k: int, n: int, params: int, acts: int, ew: int = 0) -> LayerCost:
            fwd = 2 * m * k * n
            return LayerCost(name, kind, params, fwd, 2 * fwd, acts, elementwise=ew)

        costs = [LayerCost("embed", "embedding", (V + self.max_positions + 2) * d, 0, 0, T * d, elementwise=3 * T * d),
                 LayerCost("emb_ln", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d)]
        for i in range(self.layers):
            p = f"l{i}"
            costs += [mm(f"{p}.qkv", "dense", T, d, 3 * d, 3 * d * d + 3 * d, 3 * T * d, 3 * T * d),
                      mm(f"{p}.scores", "attention", H * T, hd, T, 0, H * T * T, 5 * H * T * T),
                      mm(f"{p}.av", "attention", H * T, T, hd, 0, T * d),
                      mm(f"{p}.proj", "dense", T, d, d, d * d + d, T * d, 2 * T * d),
                      LayerCost(f"{p}.ln1", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d),
                      mm(f"{p}.fc", "dense", T, d, f, d * f + f, 2 * T * f, 9 * T * f),
                      mm(f"{p}.out", "dense", T, f, d, f * d + d, T * d, 2 * T * d),
                      LayerCost(f"{p}.ln2", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d)]
        costs += [mm("pooler", "dense", 1, d, d, d * d + d, d, d),
                  mm("mlm.dense", "dense", T, d, d, d * d + d, T * d, 9 * T * d),
                  LayerCost("mlm.ln", "layernorm", 2 * d, 0, 0, T * d, elementwise=8 * T * d),
                  mm("mlm.decoder", "dense", T, d, V, V, T * V, T * V)]  # weight tied to tok_emb: only the bias is new
        return costs


@dataclass(frozen=True)
class ResNet50V1Spec(ResNetSpec):
    name: ClassVar[str] = "resnet50-v1"
    depth: ClassVar[int] = 50
    stride_in_1x1: ClassVar[bool] = True


@dataclass(frozen=True)
class ResNet101Spec(ResNetSpec):
    name: ClassVar[str] = "resnet101"
    depth: ClassVar[int] = 101


@dataclass(frozen=True)
class ResNet101V1Spec(ResNetSpec):
    name: ClassVar[str] = "resnet101-v1"
    depth: ClassVar[int] = 101
    stride_in_1x1: ClassVar[bool] = True


def _gpt(layers: int, d: int, heads: int, seq: int) -> Callable[..., ModelSpec]:
    return lambda **kw: GPTSpec(**{"vocab": 50257, "seq_len": seq, "layers": layers, "d_model": d, "heads": heads, **kw})


#: name -> builder (keyword options override the published size, e.g. seq_len)
NAMED: dict[str, Callable[..., ModelSpec]] = {
    "bert-base": lambda **kw: BERTSpec(**{"layers": 12, "d_model": 768, "heads": 12, **kw}),
    "bert-large": lambda **kw: BERTSpec(**{"layers": 24, "d_model": 1024, "heads": 16, **kw}),
    "gpt2-small": _gpt(12, 768, 12, 1024),
    "gpt2-medium": _gpt(24, 1024, 16, 1024),
    "gpt2-large": _gpt(36, 1280, 20, 1024),
    "gpt2-xl": _gpt(48, 1600, 25, 1024),
    "gpt3-125m": _gpt(12, 768, 12, 2048),
    "gpt3-350m": _gpt(24, 1024, 16, 2048),
    "gpt3-760m": _gpt(24, 1536, 16, 2048),
    "gpt3-1.3b": _gpt(24, 2048, 16, 2048),  # Table 2.1 lists 24 heads of 128, which do not split 2048: 16 x 128,
    "gpt3-2.7b": _gpt(32, 2560, 32, 2048),
    "gpt3-6.7b": _gpt(32, 4096, 32, 2048),
    "gpt3-13b": _gpt(40, 5120, 40, 2048),  # Table 2.1 prints d_model 5140 beside 40 heads x 128 = 5120,
    "gpt3-175b": _gpt(96, 12288, 96, 2048),
    "resnet50-v1": lambda **kw: ResNet50V1Spec(**kw),
    "resnet101": lambda **kw: ResNet101Spec(**kw),
    "resnet101-v1": lambda **kw: ResNet101V1Spec(**kw),
}
#: spellings papers use -> the name here (v1.5 is the zoo's resnet50, torchvision's and NVIDIA's)
ALIASES = {"resnet-50-v1": "resnet50-v1", "resnet50v1": "resnet50-v1", "resnet-101": "resnet101",
           "resnet-101-v1": "resnet101-v1", "resnet101v1": "resnet101-v1", "bert_base": "bert-base",
           "bert_large": "bert-large", "gpt2": "gpt2-small"}


def named_spec(name: str, **opts: object) -> ModelSpec | None:
    """The named spec, or None if ``name`` is not one of NAMED (or its aliases)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in NAMED:
        return None
    opts = {k.replace("-", "_"): int(v) if isinstance(v, str) and v.isdigit() else v for k, v in opts.items()}
    try:
        return NAMED[key](**opts)
    except TypeError as e:  # an option the spec does not have
        raise UsageError(f"invalid --model-opt for model {key!r}: {e}") from None


def train_flops_closed_form(spec: ModelSpec) -> int:
    """The closed forms of the module docstring, for the tests to compare with layer_costs()."""
    if isinstance(spec, BERTSpec):
        T, d, L, V = spec.seq_len, spec.d_model, spec.layers, spec.vocab
        fwd = 2 * T * 12 * L * d * d + 4 * L * T * T * d + 2 * T * (d * d + d * V) + 2 * d * d
        return 3 * fwd
    raise TypeError(type(spec).__name__)

