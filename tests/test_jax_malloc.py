"""A JAX CPU process started as podscale starts one does not fault its step's temporaries in afresh.

XLA-CPU allocates a program's temporaries for each execution; past glibc's mmap ceiling (32 MiB)
each step maps fresh pages and faults every one of them in (~9,300 faults and 10 ms of gpt-tiny's
42 ms step here). ``jax_dp.layout`` sets glibc's malloc so the heap keeps them. The control run,
with glibc's defaults, shows the test can see the faults it guards against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scaling.backends import jax_dp, jax_env
from scaling.config import RunConfig

# a dot whose 3072 x 3072 float32 output (36 MiB) lives only inside the program (read twice, so
# XLA keeps it rather than fusing it into one reduction)
CHILD = """
import json, resource, statistics, jax, jax.numpy as jnp
x = jnp.ones((3072, 16), jnp.float32)
f = jax.jit(lambda x: (lambda a: jnp.sum(jnp.tanh(a)) + jnp.sum(a[:, :7] ** 2))(x @ x.T))
for _ in range(2):
    f(x).block_until_ready()
faults = []
for _ in range(10):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"faults": statistics.median(faults), "pages": temp / 4096}))
"""


def _faults(env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_layout_keeps_xla_temporaries_in_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(jax_dp, "accelerator", lambda: None)
    env = jax_dp.layout(RunConfig(backend="jax-pmap", devices=1))[0]
    assert env["GLIBC_TUNABLES"] == jax_env.MALLOC_TUNABLES
    ours, glibc = _faults(env), _faults({**env, "GLIBC_TUNABLES": ""})
    assert glibc["pages"] > 32 * 256  # past glibc's mmap ceiling, or the test shows nothing
    assert glibc["faults"] > 0.5 * glibc["pages"], glibc
    assert ours["faults"] < 0.05 * ours["pages"], ours


def test_a_users_own_glibc_tunables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax_dp, "accelerator", lambda: None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert "GLIBC_TUNABLES" not in jax_dp.layout(RunConfig(backend="jax-sharded", devices=2))[0]
    monkeypatch.setattr(jax_dp, "accelerator", lambda: "gpu")
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert "GLIBC_TUNABLES" not in jax_dp.layout(RunConfig(backend="jax-pmap", devices=1))[0]
