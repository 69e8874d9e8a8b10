"""The training API's own overhead: ``podscale run examples/digits_cnn.py`` (podscale.torch) ÷ a
hand-written DDP loop of the same model, data, optimizer and sample order; and the same for the
JAX API (examples/digits_cnn_jax.py on jax-pmap) ÷ a hand-written pmap loop. Median step times of
each run, in ABBA-interleaved pairs, with a bootstrap 95% interval of the median ratio.
Target: median <= 1.03 and the interval's upper end <= 1.05, on 2 devices.

Both sides time the same work per step: picking the batch (one shuffle per epoch, as podscale's
loader does), forward, backward and the optimizer step. (Until 2026-12-02 the hand-written loops
drew a fresh permutation every step *outside* their timer while podscale's step time included its
loader; that alone was ~5% of the torch step: 1.050 vs 1.002 over 6 side-by-side pairs.)

    .venv/bin/python bench/api_overhead.py --pairs 15 --steps 200 [--only torch|jax]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import abba  # noqa: E402

TORCH_LOOP = r'''
import os, sys, time, statistics, json, importlib.util
import numpy as np, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
steps, untimed, B = map(int, sys.argv[1:4])
spec = importlib.util.spec_from_file_location("ex", sys.argv[4]); ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
x, y, _, _ = ex.digits()
torch.manual_seed(0)
model = DDP(ex.DigitsCNN())
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
lossf = torch.nn.CrossEntropyLoss()
b, per_epoch, times = B // world, len(x) // B, []
for s in range(steps):
    epoch, pos = divmod(s, per_epoch)
    t = time.perf_counter()  # a step is its batch too: podscale's step time includes its loader
    if pos == 0:
        perm = np.random.default_rng([0, epoch]).permutation(len(x))
    idx = perm[pos * B:(pos + 1) * B][rank * b:(rank + 1) * b]
    xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
    loss = lossf(model(xb), yb)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    times.append(time.perf_counter() - t)
if rank == 0:
    print(json.dumps({"step_time_s": statistics.median(times[untimed:])}))
dist.destroy_process_group()
os._exit(0)
'''

JAX_LOOP = r'''
import sys, time, statistics, json, importlib.util
import numpy as np, jax, optax
from flax import nnx
steps, untimed, B = map(int, sys.argv[1:4])
spec = importlib.util.spec_from_file_location("ex", sys.argv[4]); ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
x, y, _, _ = ex.digits()
n = jax.local_device_count()
graphdef, params = nnx.split(ex.DigitsCNN(nnx.Rngs(0)), nnx.Param)
tx = optax.adam(1e-3)
opt = tx.init(params)
def step(p, o, xb, yb):
    def f(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xb), yb).mean()
    loss, g = jax.value_and_grad(f)(p)
    g, loss = jax.lax.pmean((g, loss), "d")
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss
pstep = jax.pmap(step, axis_name="d")
rep = lambda t: jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))), t)
params, opt = rep(params), rep(opt)
per_epoch, times = len(x) // B, []
for s in range(steps):
    epoch, pos = divmod(s, per_epoch)
    t = time.perf_counter()  # a step is its batch too: podscale's step time includes its loader
    if pos == 0:
        perm = np.random.default_rng([0, epoch]).permutation(len(x))
    idx = perm[pos * B:(pos + 1) * B]
    xb, yb = x[idx].reshape(n, B // n, *x.shape[1:]), y[idx].reshape(n, B // n)
    params, opt, loss = pstep(params, opt, xb, yb)
    float(loss[0])
    times.append(time.perf_counter() - t)
print(json.dumps({"step_time_s": statistics.median(times[untimed:])}))
'''


def podscale_run(example: str, backend: str, devices: int, steps: int, untimed: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        subprocess.run([sys.executable, "-m", "launchers.cli", "run", str(ROOT / "examples" / example), "--backend", backend,
                        "--devices", str(devices), "--global-batch", str(batch), "--steps", str(steps), "--untimed-steps",
                        str(untimed), "--optimizer", "adam", "--json", str(out), "--quiet"], cwd=ROOT, check=True, timeout=900)
        return json.loads(out.read_text())["step_time_s"]


def torch_loop(devices: int, steps: int, untimed: int, batch: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TORCH_LOOP)
    port = str(29500 + os.getpid() % 1000)
    procs = [subprocess.Popen([sys.executable, f.name, str(steps), str(untimed), str(batch), str(ROOT / "examples" / "digits_cnn.py")],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(devices), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"},
                              stdout=subprocess.PIPE, text=True) for r in range(devices)]
    outs = [p.communicate()[0] for p in procs]
    os.unlink(f.name)
    return json.loads(outs[0].strip().splitlines()[-1])["step_time_s"]


def jax_loop(devices: int, steps: int, untimed: int, batch: int) -> float:
    flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    p = subprocess.run([sys.executable, "-c", JAX_LOOP, str(steps), str(untimed), str(batch), str(ROOT / "examples" / "digits_cnn_jax.py")],
                       env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, check=True, timeout=900)
    return json.loads(p.stdout.strip().splitlines()[-1])["step_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--untimed", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--only", choices=("torch", "jax"))
    a = ap.parse_args()
    shape = (a.devices, a.steps, a.untimed, a.global_batch)
    if a.only != "jax":
        abba(f"podscale.torch on torch-ddp, {a.devices} ranks (examples/digits_cnn.py)",
             lambda: podscale_run("digits_cnn.py", "torch-ddp", *shape), lambda: torch_loop(*shape), a.pairs)
    if a.only != "torch":
        abba(f"podscale.jax on jax-pmap, {a.devices} devices (examples/digits_cnn_jax.py)",
             lambda: podscale_run("digits_cnn_jax.py", "jax-pmap", *shape), lambda: jax_loop(*shape), a.pairs)


if __name__ == "__main__":
    main()
