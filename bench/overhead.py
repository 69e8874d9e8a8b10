"""podscale's own overhead: its torch-ddp step time ÷ a hand-written DDP loop's, same config.

Both run as N gloo processes on this host with one thread each; the runs alternate (podscale,
hand-written, podscale, ...) so that drift in the machine's load hits both alike, and the median
of the per-pair ratios is printed. Target: <= 1.03.

    .venv/bin/python bench/overhead.py --devices 2 --repeats 5
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

HANDWRITTEN = r'''
import os, sys, time, statistics, json
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
d_in, h, d_out, B, steps, untimed = map(int, sys.argv[1:7])
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(d_in, h), torch.nn.ReLU(), torch.nn.Linear(h, d_out)))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
n = max(4 * B, 256)
x, y = torch.randn(n, d_in), torch.randn(n, d_out)
b = B // world
times = []
for s in range(steps):
    idx = (torch.arange(B) + s * B) % n
    idx = idx[rank * b:(rank + 1) * b]
    t = time.perf_counter()
    loss = F.mse_loss(model(x[idx]), y[idx])
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


def handwritten(devices: int, d_in: int, h: int, d_out: int, batch: int, steps: int, untimed: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(HANDWRITTEN)
    port = 29500 + os.getpid() % 1000
    procs = []
    for r in range(devices):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(devices), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        procs.append(subprocess.Popen([sys.executable, f.name, *map(str, (d_in, h, d_out, batch, steps, untimed))],
                                      env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    os.unlink(f.name)
    return json.loads(outs[0].strip().splitlines()[-1])["step_time_s"]


def main() -> None:
    a, shape = parse_args(__doc__)
    compare(f"torch-ddp overhead, {a.devices} ranks", "torch-ddp", handwritten, shape, a.repeats)


if __name__ == "__main__":
    main()
