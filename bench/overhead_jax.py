"""podscale's own overhead on jax-pmap: its step time ÷ a hand-written pmap loop's, same config.

Both run in a fresh process with N emulated XLA CPU devices and the same XLA flags (one thread
per device), train the same MLP with plain SGD on the same global batch split over the devices,
and sync the host once per step (``float(loss)``), as the platform notes require. The runs
alternate in ABBA order (podscale first in even pairs, second in odd ones) so that drift in the
machine's load and any position effect hit both alike; the median of the per-pair ratios is printed. Target: <= 1.03.

    .venv/bin/python bench/overhead_jax.py --devices 2 --repeats 5
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import compare, parse_args  # noqa: E402
sys.path.insert(0, str(ROOT))

HANDWRITTEN = r'''
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax import lax
d_in, h, d_out, B, steps, untimed = map(int, sys.argv[1:7])
n = jax.local_device_count()
rng = np.random.default_rng(0)
def lin(i, o):
    bound = 1 / np.sqrt(i)
    return rng.uniform(-bound, bound, (i, o)).astype(np.float32), rng.uniform(-bound, bound, (o,)).astype(np.float32)
(w1, b1), (w2, b2) = lin(d_in, h), lin(h, d_out)
params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
N = max(4 * B, 256)
x, y = rng.standard_normal((N, d_in), dtype=np.float32), rng.standard_normal((N, d_out), dtype=np.float32)

def loss_fn(p, xb, yb):
    out = jnp.maximum(xb @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    return jnp.mean((out - yb) ** 2)

def step(p, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
    g, loss = lax.pmean((g, loss), "data")
    return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), loss

pstep = jax.pmap(step, axis_name="data")
p = jax.tree.map(lambda a: np.broadcast_to(a, (n, *a.shape)), params)
times = []
for s in range(steps):
    idx = (np.arange(B) + s * B) % N
    xb, yb = x[idx].reshape(n, B // n, d_in), y[idx].reshape(n, B // n, d_out)
    t = time.perf_counter()
    p, loss = pstep(p, xb, yb)
    float(np.asarray(loss)[0])
    times.append(time.perf_counter() - t)
print(json.dumps({"step_time_s": statistics.median(times[untimed:])}))
'''


def _env(devices: int) -> dict[str, str]:
    from scaling.backends import jax_dp
    from scaling.config import RunConfig

    return {**os.environ, **jax_dp.layout(RunConfig(backend="jax-pmap", devices=devices, global_batch=devices))[0]}


def handwritten(devices: int, d_in: int, h: int, d_out: int, batch: int, steps: int, untimed: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(HANDWRITTEN)
    try:
        out = subprocess.run([sys.executable, f.name, *map(str, (d_in, h, d_out, batch, steps, untimed))],
                             env=_env(devices), capture_output=True, text=True, check=True, timeout=600).stdout
    finally:
        os.unlink(f.name)
    return json.loads(out.strip().splitlines()[-1])["step_time_s"]


def main() -> None:
    a, shape = parse_args(__doc__)
    compare(f"jax-pmap overhead, {a.devices} emulated devices", "jax-pmap", handwritten, shape, a.repeats)


if __name__ == "__main__":
    main()
