"""Gloo's I/O thread runs at SCHED_IDLE in every torch-ddp rank on CPU, and in every process of a
JAX run over several processes (``scaling.backends.gloo_io``):
its spin on a message whose buffer is not posted yet otherwise holds the core for a scheduler tick
(4 ms here). The speed-up is measured side by side in ``bench/gloo_io.py``; these tests check that
a user's own script gets the setting on every rank, that ``PODSCALE_GLOO_IO=normal`` leaves gloo
alone, and that a bad value is a one-line error before any rank starts."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import podscale

# a user's script: trains through podscale, then reports its gloo I/O threads' scheduling policy
SCRIPT = '''
import json, os, sys
import numpy as np
import torch
import podscale.torch as ps

run = ps.init()
model = torch.nn.Linear(8, 1)
x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
ps.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), (x, x[:, :1]))
tids = [int(t) for t in os.listdir("/proc/self/task")
        if open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop"]
policies = sorted(os.sched_getscheduler(t) for t in tids)
with open(os.path.join(sys.argv[1], f"rank{run.rank}.json"), "w") as f:
    json.dump(policies, f)
'''


# the same for a JAX user: jaxlib's gloo starts its reader unnamed; podscale names it as torch's is
JAX_SCRIPT = '''
import json, os, sys
import numpy as np
import optax
from flax import nnx
import podscale.jax as ps

run = ps.init()
model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
ps.fit(model, optax.sgd(0.1), lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, x[:, :1]))
tids = [int(t) for t in os.listdir("/proc/self/task")
        if open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop"]
policies = sorted(os.sched_getscheduler(t) for t in tids)
with open(os.path.join(sys.argv[1], f"rank{run.rank}.json"), "w") as f:
    json.dump(policies, f)
'''


#: (backend, its user's script, flags): torch-ddp runs a process per device; JAX here one device in each of two
FRAMEWORKS = [("torch-ddp", SCRIPT, ()), ("jax-pmap", JAX_SCRIPT, ("--processes", "2"))]


@pytest.mark.parametrize("backend,source,flags", FRAMEWORKS, ids=["torch", "jax"])
@pytest.mark.parametrize("setting,policy", [(None, os.SCHED_IDLE), ("normal", os.SCHED_OTHER)], ids=["idle", "normal"])
def test_every_rank_of_a_users_script_has_its_gloo_reader_at_the_chosen_priority(tmp_path, monkeypatch, backend, source,
                                                                                  flags, setting, policy):
    monkeypatch.delenv("PODSCALE_GLOO_IO", raising=False)
    script = tmp_path / "train.py"
    script.write_text(source)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PODSCALE_GLOO_IO": setting} if setting else {}
    podscale("run", str(script), "--backend", backend, "--devices", "2", *flags, "--global-batch", "16", "--steps", "4",
             "--probe-steps", "0", "--", str(out), env=env)
    for rank in (0, 1):
        policies = json.loads((out / f"rank{rank}.json").read_text())
        # torch: a reader per device of the group; jaxlib's one, named by podscale
        assert policies and set(policies) == {policy} and (backend != "jax-pmap" or len(policies) == 1), (rank, policies)


@pytest.mark.parametrize("backend", ["torch-ddp", "jax-pmap"])
def test_a_bad_setting_is_a_one_line_error_before_any_rank_starts(tmp_path, backend):
    p = podscale("run", "--backend", backend, "--devices", "2", "--steps", "4", "--json", str(tmp_path / "r.json"),
                 env={"PODSCALE_GLOO_IO": "fast"}, check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "PODSCALE_GLOO_IO='fast'" in lines[0] and "idle, normal" in lines[0], p.stderr
    assert not (tmp_path / "r.json").exists()
