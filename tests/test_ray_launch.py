"""``podscale launch`` against a real 3-node Ray cluster that this module starts on 127.0.0.1.

One cluster for this module (each node costs seconds and ~0.5 GB; kept for the whole session, its
idle head, nodes and agents took about a fifth of one core from every later test): a head with the
dashboard (the Jobs API) and two worker nodes joined with ``ray start --address``, each its own
raylet, object store and agents, 2 logical CPUs and a custom resource naming it, so that where Ray
put a worker is observable. All share one temp dir, and a directory of this host stands in for the
shared filesystem (NFS) a real cluster's checkpoints need. Stopped at the end by their own process
IDs (never ``ray stop``, which would end every Ray on the host). Jobs go through the Jobs API
exactly as a user's would. The GCS health-checks nodes every second (3 misses: dead), so that a lost
node is noticed in seconds rather than Ray's default ~15 s.
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


NODE_CPUS = 2
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                      "RAY_health_check_timeout_ms": "2000"}


@pytest.fixture(scope="module")
def ray_head() -> LocalHead:
    head = start_head(num_cpus=NODE_CPUS, resources={"head": 1.0}, env=FAST_HEALTH_CHECKS)
    try:
        for name in ("node1", "node2"):
            head.add_node(name, NODE_CPUS)
        yield head
    finally:
        pids = head.pids()
        head.stop()
        import psutil

        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"head processes left running: {alive}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    d = tmp_path_factory.mktemp("local")
    podscale(*RUN, "--quiet", "--json", str(d / "r.json"), "--params-out", str(d / "p.npz"))
    return json.loads((d / "r.json").read_text()), dict(np.load(d / "p.npz"))


def _launch(head: LocalHead, tmp: Path, *extra: str, run_extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 200):
    return podscale("launch", "--address", head.address, "--quiet", *extra, "--", *RUN, *run_extra,
                    "--json", str(tmp / "r.json"), "--params-out", str(tmp / "p.npz"), env=env, check=check, timeout=timeout)


def _actors(head: LocalHead, class_name: str) -> set[str]:
    """Ids of the cluster's actors of ``class_name`` (alive or dead): evidence, from Ray's own state
    API, that the run went through Ray and not a fallback to the local launcher."""
    return set(_actor_nodes(head, class_name))


def _actor_nodes(head: LocalHead, class_name: str) -> dict[str, str]:
    """Actor id -> the id of the node it ran on, for every actor of ``class_name``."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(address=head.address, filters=[("class_name", "=", class_name)],
                                                       limit=10_000, raise_on_missing_output=False)}


def _same_params(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_torch_ddp_on_ray_train_equals_local_launcher(ray_head, local_reference, tmp_path):
    """4 Ray Train workers need two of the 2-CPU nodes: gloo across nodes, bit for bit the local run."""
    before = _actor_nodes(ray_head, "RayTrainWorker")
    _launch(ray_head, tmp_path)
    ran = {a: n for a, n in _actor_nodes(ray_head, "RayTrainWorker").items() if a not in before}
    assert len(ran) == 4 and len(set(ran.values())) == 2, ran  # Ray Train ran the 4 ranks, on two nodes
    got = json.loads((tmp_path / "r.json").read_text())
    ref, ref_params = local_reference
    assert set(got) == set(ref) | {"restarts"} and got["restarts"] == []
    assert got["losses"] == ref["losses"] and len(got["losses"]) == 6
    assert got["final_params_l2"] == ref["final_params_l2"]
    assert got["replicas_identical"] is True and got["processes"] == 4
    assert _same_params(dict(np.load(tmp_path / "p.npz")), ref_params)


JAX_RUN = ["run", "--backend", "jax-sharded", "--devices", "4", "--processes", "2", "--global-batch", "32", "--steps", "6",
           "--untimed-steps", "1", "--lr", "0.05", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def jax_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    d = tmp_path_factory.mktemp("jaxlocal")
    podscale(*JAX_RUN, "--checkpoint-dir", str(d / "ck"), "--quiet", "--json", str(d / "r.json"), "--params-out", str(d / "p.npz"))
    return json.loads((d / "r.json").read_text()), dict(np.load(d / "p.npz"))


@pytest.mark.timeout(240)
def test_jax_two_host_actors_equal_local_launcher(ray_head, jax_reference, tmp_path):
    """2 Ray actors x 2 emulated devices joined by jax.distributed = the local 2-process run; one
    actor per node (STRICT_SPREAD), as the hosts of a pod slice."""
    before = _actor_nodes(ray_head, "PodHost")
    podscale("launch", "--address", ray_head.address, "--quiet", "--", *JAX_RUN, "--checkpoint-dir", str(tmp_path / "ck"),
             "--json", str(tmp_path / "r.json"), "--params-out", str(tmp_path / "p.npz"), timeout=200)
    ran = {a: n for a, n in _actor_nodes(ray_head, "PodHost").items() if a not in before}
    assert len(ran) == 2 and len(set(ran.values())) == 2, ran  # the 2 processes, each on its own node
    got = json.loads((tmp_path / "r.json").read_text())
    ref, ref_params = jax_reference
    assert set(got) == set(ref) | {"restarts"} and got["restarts"] == []
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
    [restart] = got["restarts"]  # host 1's process died; its node lives on: the record says so
    assert restart["step"] == 2 and "JAX host 1 died" in restart["cause"] and restart["node"] in ray_head.alive_nodes(), restart


@pytest.mark.timeout(60)
def test_every_node_listens_on_loopback_only(ray_head):
    socks = ray_head.listening()
    assert any(port == ray_head.dashboard_port for *_, port in socks), socks  # the job server is among them
    assert len(ray_head.nodes) == 2 and len(ray_head.alive_nodes()) == 3
    for mine in (ray_head.listening(own_only=True), *(n.listening() for n in ray_head.nodes)):  # head, then each node
        assert len({pid for pid, *_ in mine}) >= 2, mine  # raylet, agents (and on the head GCS, dashboard): really inspected
        bad = [s for s in mine if s[2] not in ("127.0.0.1", "::ffff:127.0.0.1")]
        assert not bad, f"sockets listening beyond 127.0.0.1: {bad}"


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
    [restart] = got["restarts"]  # from Ray's actor table: the worker process died, not its node
    assert restart["step"] == 2 and restart["cause"].startswith("WORKER_DIED") and restart["node"] in ray_head.alive_nodes()
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
    assert "too few resources" in last and "needs 8 CPU" in last and f"has {3 * NODE_CPUS} CPU" in last, last
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


# ---- placement and node loss across the cluster's nodes ---------------------------------------


@pytest.mark.timeout(120)
def test_jax_hosts_that_cannot_spread_fail_within_the_resource_timeout(ray_head, tmp_path):
    """4 JAX hosts, one per node (STRICT_SPREAD), on a 3-node cluster: never placeable."""
    t = time.monotonic()
    p = podscale("launch", "--address", ray_head.address, "--quiet", "--resource-timeout", "3", "--",
                 "run", "--backend", "jax-sharded", "--devices", "4", "--processes", "4", "--steps", "3",
                 check=False, timeout=100)
    took = time.monotonic() - t
    assert p.returncode == 3, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "too few resources for 4 JAX host actor(s)" in last and "4 nodes" in last and "has 3 alive node(s)" in last, last
    assert took < 60


NODE_LOSS_RUN = [*JAX_RUN[:JAX_RUN.index("--steps")], "--steps", "8", "--untimed-steps", "1", "--lr", "0.05", "--checkpoint-every", "2"]


@pytest.mark.timeout(300)
def test_a_lost_node_and_the_run_goes_on_from_its_checkpoint_on_the_others(ray_head, tmp_path):
    """2 JAX hosts on 2 of the 3 nodes; host 0 holds at step 5 (checkpoint 4 is on the shared
    directory by then) while the test kills the non-head node of a host, every process of it, as a
    machine that lost power. The run rebuilds its hosts on the two nodes left and ends with the
    parameters of an uninterrupted run."""
    import subprocess
    import sys

    ref_dir = tmp_path / "ref"
    podscale(*NODE_LOSS_RUN, "--checkpoint-dir", str(ref_dir / "ck"), "--quiet", "--json", str(ref_dir / "r.json"),
             "--params-out", str(ref_dir / "p.npz"))
    ref, ref_params = json.loads((ref_dir / "r.json").read_text()), dict(np.load(ref_dir / "p.npz"))
    shared, release = tmp_path / "shared-ck", tmp_path / "release"
    before = _actor_nodes(ray_head, "PodHost")
    cmd = [sys.executable, "-m", "launchers.cli", "launch", "--address", ray_head.address, "--quiet", "--max-failures", "1",
           "--", *NODE_LOSS_RUN, "--checkpoint-dir", str(shared), "--json", str(tmp_path / "r.json"),
           "--params-out", str(tmp_path / "p.npz")]
    env = {**os.environ, "PODSCALE_FAULT": "0:5:hold", "PODSCALE_FAULT_RELEASE": str(release), "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 150
        while not (shared / "ckpt-00000004.npz").exists():
            assert job.poll() is None and time.monotonic() < deadline, "the run never wrote checkpoint 4"
            time.sleep(0.2)
        hosts = {a: n for a, n in _actor_nodes(ray_head, "PodHost").items() if a not in before}
        victim = next(ray_head.node_of(n) for n in hosts.values() if ray_head.node_of(n) is not None)
        victim.kill()
        release.touch()
        out, err = job.communicate(timeout=200)
    finally:
        if job.poll() is None:
            job.kill()
        if len(ray_head.alive_nodes()) < 3:
            ray_head.add_node(f"node{len(ray_head.nodes) + 1}", NODE_CPUS)  # 3 nodes again, for the tests after this one
    assert job.returncode == 0, err
    got = json.loads((tmp_path / "r.json").read_text())
    [restart] = got["restarts"]
    assert restart["node"] == victim.node_id and restart["step"] == got["resumed_from_step"] == 4, restart
    assert "died" in restart["cause"], restart
    lines = [ln for ln in err.splitlines() if "restart 1:" in ln]
    assert len(lines) == 1 and victim.node_id in lines[0] and "step 4" in lines[0], err
    assert got["losses"] == ref["losses"] and _same_params(dict(np.load(tmp_path / "p.npz")), ref_params)
    after = {a: n for a, n in _actor_nodes(ray_head, "PodHost").items() if a not in before and a not in hosts}
    assert len(after) == 2 and victim.node_id not in after.values()  # rebuilt on the two nodes left
