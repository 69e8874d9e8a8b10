"""``podscale launch`` against a real Ray head that this test session starts on 127.0.0.1.

One head for the whole session (starting one costs seconds and ~1 GB): its own temp dir, 4
logical CPUs declared, stopped at the end by its own process IDs (never ``ray stop``, which would
end every Ray on the host). Jobs go through the Jobs API exactly as a user's would.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from launchers.ray_head import LocalHead, start_head
from tests.conftest import ROOT, podscale

pytestmark = pytest.mark.ray

RUN = ["run", "--backend", "torch-ddp", "--devices", "4", "--global-batch", "32", "--steps", "6", "--untimed-steps", "1",
       "--lr", "0.05", "--step-timeout", "60"]


@pytest.fixture(scope="session")
def ray_head() -> LocalHead:
    head = start_head(num_cpus=4)
    try:
        yield head
    finally:
        pids = head.pids()
        head.stop()
        import psutil

        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"head processes left running: {alive}"


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    d = tmp_path_factory.mktemp("local")
    podscale(*RUN, "--quiet", "--json", str(d / "r.json"), "--params-out", str(d / "p.npz"))
    return json.loads((d / "r.json").read_text()), dict(np.load(d / "p.npz"))


def _launch(head: LocalHead, tmp: Path, *extra: str, run_extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 200):
    return podscale("launch", "--address", head.address, "--quiet", *extra, "--", *RUN, *run_extra,
                    "--json", str(tmp / "r.json"), "--params-out", str(tmp / "p.npz"), env=env, check=check, timeout=timeout)


def _actors(head: LocalHead, class_name: str) -> set[str]:
    """Ids of the head's actors of ``class_name`` (alive or dead): evidence, from Ray's own state API,
    that the run went through Ray and not a fallback to the local launcher."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=head.address, filters=[("class_name", "=", class_name)],
                                           limit=10_000, raise_on_missing_output=False)}


def _same_params(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_torch_ddp_on_ray_train_equals_local_launcher(ray_head, local_reference, tmp_path):
    before = _actors(ray_head, "RayTrainWorker")
    _launch(ray_head, tmp_path)
    assert len(_actors(ray_head, "RayTrainWorker") - before) == 4  # Ray Train ran the 4 ranks
    got = json.loads((tmp_path / "r.json").read_text())
    ref, ref_params = local_reference
    assert set(got) == set(ref)
    assert got["losses"] == ref["losses"] and len(got["losses"]) == 6
    assert got["final_params_l2"] == ref["final_params_l2"]
    assert got["replicas_identical"] is True and got["processes"] == 4
    assert _same_params(dict(np.load(tmp_path / "p.npz")), ref_params)


JAX_RUN = ["run", "--backend", "jax-sharded", "--devices", "4", "--processes", "2", "--global-batch", "32", "--steps", "6",
           "--untimed-steps", "1", "--lr", "0.05", "--checkpoint-every", "2"]


@pytest.fixture(scope="session")
def jax_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    d = tmp_path_factory.mktemp("jaxlocal")
    podscale(*JAX_RUN, "--checkpoint-dir", str(d / "ck"), "--quiet", "--json", str(d / "r.json"), "--params-out", str(d / "p.npz"))
    return json.loads((d / "r.json").read_text()), dict(np.load(d / "p.npz"))


@pytest.mark.timeout(240)
def test_jax_two_host_actors_equal_local_launcher(ray_head, jax_reference, tmp_path):
    """2 Ray actors x 2 emulated devices joined by jax.distributed = the local 2-process run."""
    before = _actors(ray_head, "PodHost")
    podscale("launch", "--address", ray_head.address, "--quiet", "--", *JAX_RUN, "--checkpoint-dir", str(tmp_path / "ck"),
             "--json", str(tmp_path / "r.json"), "--params-out", str(tmp_path / "p.npz"), timeout=200)
    assert len(_actors(ray_head, "PodHost") - before) == 2  # the actor group ran the 2 processes
    got = json.loads((tmp_path / "r.json").read_text())
    ref, ref_params = jax_reference
    assert set(got) == set(ref)
    assert got["processes"] == 2 and got["backend_info"]["devices_per_process"] == 2
    assert got["losses"] == ref["losses"] and got["resumed_from_step"] is None
    assert _same_params(dict(np.load(tmp_path / "p.npz")), ref_params)


@pytest.mark.timeout(240)
def test_jax_host_actor_killed_group_rebuilt_from_checkpoint(ray_head, jax_reference, tmp_path):
    once = tmp_path / "fault-fired"
    podscale("launch", "--address", ray_head.address, "--quiet", "--max-failures", "1", "--", *JAX_RUN,
             "--checkpoint-dir", str(tmp_path / "ck"), "--json", str(tmp_path / "r.json"), "--params-out", str(tmp_path / "p.npz"),
             env={"PODSCALE_FAULT": "1:3", "PODSCALE_FAULT_ONCE": str(once)}, timeout=200)
    assert once.exists()
    got = json.loads((tmp_path / "r.json").read_text())
    ref, ref_params = jax_reference
    assert got["resumed_from_step"] == 2 and got["losses"] == ref["losses"]
    assert _same_params(dict(np.load(tmp_path / "p.npz")), ref_params)


@pytest.mark.timeout(60)
def test_head_listens_on_loopback_only(ray_head):
    socks = ray_head.listening()
    assert any(port == ray_head.dashboard_port for *_, port in socks), socks  # the job server is among them
    assert len({pid for pid, *_ in socks}) >= 3  # GCS, raylet, dashboard, agents: really inspected
    bad = [s for s in socks if s[2] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not bad, f"sockets listening beyond loopback: {bad}"


# Two ranks, because a sum of two floats does not depend on its order: with 4+ gloo ranks DDP's
# bucket layout (rebuilt after the first step of each attempt) changes the summation order and a
# resumed run can differ from an uninterrupted one in the last bit, locally as on Ray.
FAULT_RUN = ("--devices", "2", "--checkpoint-every", "2")


@pytest.mark.timeout(300)
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_head, tmp_path):
    ref_dir = tmp_path / "ref"
    podscale(*RUN, *FAULT_RUN, "--checkpoint-dir", str(ref_dir / "ck"), "--quiet", "--json", str(ref_dir / "r.json"),
             "--params-out", str(ref_dir / "p.npz"))
    ref, ref_params = json.loads((ref_dir / "r.json").read_text()), dict(np.load(ref_dir / "p.npz"))
    once = tmp_path / "fault-fired"
    _launch(ray_head, tmp_path, "--max-failures", "1", run_extra=(*FAULT_RUN, "--checkpoint-dir", str(tmp_path / "store")),
            env={"PODSCALE_FAULT": "1:3", "PODSCALE_FAULT_ONCE": str(once)})
    assert once.exists()  # the first attempt really lost rank 1 at step 3
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["resumed_from_step"] == 2
    assert got["losses"] == ref["losses"]
    assert _same_params(dict(np.load(tmp_path / "p.npz")), ref_params)
    assert list((tmp_path / "store").rglob("ckpt-00000002.pt"))  # checkpoints live in the run's storage path


@pytest.mark.timeout(180)
def test_worker_death_beyond_max_failures_is_a_clear_error(ray_head, tmp_path):
    p = _launch(ray_head, tmp_path, "--max-failures", "0", run_extra=(*FAULT_RUN, "--checkpoint-dir", str(tmp_path / "store")),
                env={"PODSCALE_FAULT": "1:3", "PODSCALE_FAULT_ONCE": str(tmp_path / "once")}, check=False)
    assert p.returncode == 3, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "worker died" in last and "--max-failures 0" in last, last
    assert not (tmp_path / "r.json").exists()


@pytest.mark.timeout(120)
def test_too_few_cpus_fails_within_the_resource_timeout(ray_head, tmp_path):
    t = time.monotonic()
    p = podscale("launch", "--address", ray_head.address, "--quiet", "--resource-timeout", "3", "--",
                 "run", "--devices", "8", "--steps", "3", check=False, timeout=100)
    took = time.monotonic() - t
    assert p.returncode == 3, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "too few resources" in last and "needs 8 CPU" in last and "has 4 CPU" in last, last
    assert took < 60  # 3 s of waiting plus the job's start-up, never Ray Train's endless retry


def test_bad_run_flags_fail_before_any_ray_starts():
    t = time.monotonic()
    p = podscale("launch", "--", "run", "--devices", "3", "--global-batch", "64", check=False, timeout=60)
    assert p.returncode == 2
    assert "--global-batch 64" in p.stderr and "Traceback" not in p.stderr
    p = podscale("launch", "--max-failures", "-5", "--", "run", check=False, timeout=60)
    assert p.returncode == 2 and "--max-failures -5" in p.stderr
    assert time.monotonic() - t < 30


@pytest.mark.timeout(240)
def test_a_users_script_travels_with_the_job_and_equals_the_local_run(ray_head, tmp_path):
    """The script and the module beside it (examples/chars.py) are the job's working_dir."""
    script = ["run", str(ROOT / "examples" / "hf_gpt2.py"), "--devices", "2", "--global-batch", "8", "--steps", "4",
              "--optimizer", "adam", "--lr", "3e-3"]
    podscale(*script, "--quiet", "--json", str(tmp_path / "local.json"))
    podscale("launch", "--address", ray_head.address, "--quiet", "--", *script, "--json", str(tmp_path / "r.json"))
    got, ref = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "local.json"))
    assert got["model"] == "GPT2LMHeadModel" and got["script"] == "hf_gpt2.py"
    assert got["losses"] == ref["losses"] and got["replicas_identical"]


# ---- the job lifecycle: launch --no-wait, then podscale job status|logs|stop ------------------


def _wait_status(job_id: str, env: dict[str, str], want: tuple[str, ...], limit: float) -> str:
    deadline = time.monotonic() + limit
    while True:
        line = podscale("job", "status", job_id, env=env, timeout=60).stdout.strip().splitlines()[0]
        if any(f": {w}" in line for w in want):
            return line
        assert time.monotonic() < deadline, f"job {job_id} not {want} after {limit:g}s: {line}"
        time.sleep(1.0)


@pytest.mark.timeout(300)
def test_no_wait_job_through_ray_address_status_result_and_logs(ray_head, local_reference, tmp_path):
    env = {"RAY_ADDRESS": ray_head.address}  # as `ray job` reads it: no --address anywhere below
    before = _actors(ray_head, "RayTrainWorker")
    t = time.monotonic()
    p = podscale("launch", "--no-wait", "--quiet", "--", *RUN, env=env, timeout=120)
    job_id = p.stdout.strip().splitlines()[-1]
    assert job_id.startswith("podscale-") and time.monotonic() - t < 60  # returned before the job ended
    line = _wait_status(job_id, env, ("SUCCEEDED", "FAILED", "STOPPED"), 200)
    assert line.startswith(f"{job_id}: SUCCEEDED (torch-ddp x 4, 6 steps"), line
    podscale("job", "status", job_id, "--json", str(tmp_path / "r.json"), env=env)
    got, (ref, _) = json.loads((tmp_path / "r.json").read_text()), local_reference
    assert got["losses"] == ref["losses"] and got["devices"] == 4
    assert len(_actors(ray_head, "RayTrainWorker") - before) == 4  # it ran on that head, through Ray Train
    logs = podscale("job", "logs", job_id, env=env).stdout
    assert "PODSCALE_RESULT_JSON" not in logs and "PODSCALE_PARAMS_NPZ" not in logs


@pytest.mark.timeout(240)
def test_job_stop_ends_a_running_job_and_its_ranks(ray_head, tmp_path):
    import psutil

    env = {"RAY_ADDRESS": ray_head.address}
    p = podscale("launch", "--no-wait", "--quiet", "--train", "local", "--", "run", "--devices", "2", "--steps", "1000000",
                 "--probe-steps", "0", "--step-timeout", "60", env=env, timeout=120)
    job_id = p.stdout.strip().splitlines()[-1]
    _wait_status(job_id, env, ("RUNNING",), 120)

    def ranks() -> list[int]:
        return [q.pid for q in psutil.process_iter(["cmdline"]) if "scaling.worker" in " ".join(q.info["cmdline"] or [])]

    deadline = time.monotonic() + 90
    while not ranks():  # the job's driver has started its local run's ranks
        assert time.monotonic() < deadline, "the job's ranks never started"
        time.sleep(0.5)
    out = podscale("job", "stop", job_id, env=env, timeout=90).stdout
    assert out.strip() == f"{job_id}: STOPPED", out
    deadline = time.monotonic() + 20
    while ranks():  # the ranks die with the job's driver (their launcher)
        assert time.monotonic() < deadline, f"ranks outlived the stopped job: {ranks()}"
        time.sleep(0.5)
    again = podscale("job", "stop", job_id, env=env).stdout  # stopping an ended job says so
    assert again.strip() == f"{job_id}: STOPPED"
    p = podscale("job", "status", job_id, "--json", str(tmp_path / "r.json"), env=env, check=False)
    assert p.returncode == 3 and "has no result" in p.stderr.strip().splitlines()[-1] and not (tmp_path / "r.json").exists()


def test_job_commands_refuse_bad_input_in_one_line(ray_head):
    p = podscale("job", "status", "podscale-nope", "--address", ray_head.address, check=False, timeout=60)
    assert p.returncode == 2 and "no job 'podscale-nope'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = podscale("job", "logs", "podscale-nope", env={"RAY_ADDRESS": ""}, check=False, timeout=60)
    assert p.returncode == 2 and "RAY_ADDRESS" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = podscale("launch", "--no-wait", "--", "run", env={"RAY_ADDRESS": ""}, check=False, timeout=60)
    assert p.returncode == 2 and "--no-wait needs a cluster" in p.stderr, p.stderr
    p = podscale("launch", "--no-wait", "--address", ray_head.address, "--", "run", "--json", "r.json", check=False, timeout=60)
    assert p.returncode == 2 and "job status ID --json" in p.stderr, p.stderr
