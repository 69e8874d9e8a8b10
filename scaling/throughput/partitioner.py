"""What XLA's SPMD partitioner costs jax-sharded's data-parallel step beyond the all-reduce itself.

jax-sharded's default step is one jit program over the global batch; XLA's partitioner inserts
the gradient all-reduce. On XLA-CPU that program runs far slower than the per-device program with
the same all-reduce stated (``shard_map`` + ``psum``, the step ``PODSCALE_JAX_STEP=shard_map``
builds, and what pmap runs): the partitioned step computes a batch-sharded matmul's weight
gradient transposed ([out, in]), all-reduces it so, and every optimizer read of it then crosses
its layout. The raw all-reduce is the same in both (jit's 1 MiB at N = 2: 0.16 ms; pmap's psum:
0.21). Measured here on one 512 x 512 weight (1 MiB of gradient): Adam's step 1.6 ms slower at
N = 2, 3.0 at 4, 6 at 8; SGD's 0.7, 1.4, 2.5. mlp 256-1024-10 at N = 2: 3.0-3.8 ms a step
against 1.8-2.0 for the shard_map step, where the prediction (from pmap's psum curve) said 2.0.

What a byte costs depends on the weight's fan-in. Reading the transposed gradient walks rows of
fan-in floats; at a multiple of 128 (512-byte rows: the same cache sets again and again) it costs
several times more. Adam, per MiB, here: 512 x 512 1.4 ms at N = 2, 2.9 at 4; 500 x 500 0.4 and
1.2; 1024 x 1000 1.9 and 3.6 against 1000 x 1024 0.7 and 1.1. Pricing every byte at 512 x 512's
rate put mlp 1000-1024-10 at 47% over at N = 16.

So the calibration times both programs of a one-weight step at each N, for a weight of each kind
(``STRIDED_SIDE``, ``PLAIN_SIDE``), and a jax-sharded prediction adds the difference per gradient
byte beyond the reference model's (whose step, in the overhead, paid it already), for the run's
optimizer, each tensor at its kind's rate (``strided``). Runs in the calibration's XLA worker process.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

#: the probes' weights: S x S float32 (about 1 MiB of gradient), 32 samples per device; the
#: strided one's fan-in is a multiple of STRIDE, the plain one's is not
STRIDED_SIDE = 512
PLAIN_SIDE = 500
BATCH = 32
STRIDE = 128
#: the key of an optimizer's rate for plain tensors (the bare optimizer name: strided ones)
PLAIN = ":plain"


def strided(shape: tuple[int, ...]) -> bool:
    """Whether a matmul weight ([fan-in, fan-out], the zoo's layout) has the costly transposed read.
    Convolution kernels and vectors are not priced as strided: the probe measured a dense weight."""
    return len(shape) == 2 and shape[0] % STRIDE == 0


def strided_bytes(shapes: list[tuple[int, ...]], itemsize: int = 4) -> int:
    """Gradient bytes of the tensors ``strided`` calls strided."""
    return sum(itemsize * math.prod(s) for s in shapes if strided(s))


def tax_per_byte(reps: int) -> dict[str, float]:
    """Seconds per gradient byte the partitioned step costs beyond the shard_map one, per optimizer
    (``adam``, ``sgd``: a strided weight; ``adam:plain``, ``sgd:plain``: a plain one), on this
    process's devices (none at one device: nothing is partitioned)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from scaling.throughput.layer_rates import time_calls

    devs = jax.devices()
    n = len(devs)
    if n < 2:
        return {}
    mesh = Mesh(np.array(devs), ("d",))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))
    out = {}
    for (name, tx), (side, kind) in itertools.product((("adam", optax.adam(1e-6)), ("sgd", optax.sgd(1e-6))),
                                                      ((STRIDED_SIDE, ""), (PLAIN_SIDE, PLAIN))):
        x = jax.device_put(np.ones((BATCH * n, side), np.float32), dat)
        w0 = np.full((side, side), 0.01, np.float32)

        def step(p: Any, s: Any, xb: Any, reduce: Any, tx: Any = tx) -> Any:
            loss, g = jax.value_and_grad(lambda q: jnp.mean((xb @ q) ** 2))(p)
            u, s = tx.update(reduce(g), s, p)
            return optax.apply_updates(p, u), s, loss

        partitioned = jax.jit(lambda p, s, xb: step(p, s, xb, lambda g: g), in_shardings=(rep, rep, dat),
                              out_shardings=(rep, rep, rep))
        stated = jax.jit(jax.shard_map(lambda p, s, xb: step(p, s, xb, lambda g: jax.lax.pmean(g, "d")), mesh=mesh,
                                       in_specs=(P(), P(), P("d")), out_specs=(P(), P(), P()), check_vma=False))

        def seconds(fn: Any, tx: Any = tx, w0: Any = w0, x: Any = x) -> float:
            st = [jax.device_put(w0, rep), jax.device_put(tx.init(w0), rep)]

            def run() -> None:
                st[0], st[1], loss = fn(st[0], st[1], x)
                loss.block_until_ready()

            run()
            return time_calls(run, reps, 8)

        # interleaved, the faster of two each: the machine's drift hits both alike
        t_part, t_stated, t_part2, t_stated2 = (seconds(f) for f in (partitioned, stated, partitioned, stated))
        t_part, t_stated = min(t_part, t_part2), min(t_stated, t_stated2)
        out[name + kind] = max(0.0, t_part - t_stated) / (side * side * 4)
    return out
