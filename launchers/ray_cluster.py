"""``podscale launch``: submit a run to a Ray cluster through the Jobs API and bring its result back.

The job ships this working tree (``runtime_env.working_dir``), runs ``python -m launchers.ray_job``
on the cluster with the cluster's own Python, and prints its result as marked lines in the job log
(see ``launchers.ray_job``): the client streams the log, waits for the job, and parses the marks,
so the result crosses any network the Jobs API crosses, and no path on this machine is assumed
to exist on the cluster. Without ``--address`` a private loopback-only head is started for the
job and stopped after it (``launchers.ray_head``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from scaling.errors import RunFailed, UsageError

from launchers.ray_job import ERROR_MARK, PARAMS_MARK, PNG_MARK, RESULT_MARK

ROOT = Path(__file__).resolve().parent.parent
#: never shipped with the job: virtual envs, history, run outputs, caches
EXCLUDES = [".venv", ".venv-xla", ".git", "runs", "out", "build", "__pycache__", "*.egg-info", ".pytest_cache", ".whl", ".gl"]
#: environment variables of this shell that travel into the job (fault injection, cache, debug)
PASS_ENV_PREFIXES = ("PODSCALE_",)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class LaunchRequest:
    run_argv: list[str]
    """``run ...`` exactly as after ``podscale launch --``."""
    address: str | None = None
    train: str = "auto"
    max_failures: int = 0
    resource_timeout: float = 60.0
    python: str | None = None
    num_cpus: int | None = None
    want_params: bool = False
    job_timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    script_dir: str | None = None
    """A user's script run: its directory is the job's working_dir (podscale travels as py_modules)."""


@dataclass
class JobOutcome:
    job_id: str
    status: str
    result: dict[str, Any] | None
    params_npz: bytes | None
    error: dict[str, str] | None
    logs: str


def is_local_address(address: str | None) -> bool:
    if address in (None, "auto"):
        return True
    host = urlparse(address if "://" in address else f"http://{address}").hostname
    return host in ("127.0.0.1", "localhost", "::1")


def job_python(req: LaunchRequest) -> str:
    """The interpreter of the job. The head's PATH python is often not the one with podscale
    (PLATFORM_NOTES), so on this machine the job uses this very interpreter by absolute path; on
    a remote cluster, the one ``--python`` names (the cluster YAMLs install one), else ``python``."""
    if req.python:
        return req.python
    return sys.executable if is_local_address(req.address) else "python"


def entrypoint(req: LaunchRequest) -> str:
    import shlex

    args = [job_python(req), "-m", "launchers.ray_job", "--train", req.train, "--max-failures", str(req.max_failures),
            "--resource-timeout", f"{req.resource_timeout:g}"]
    if req.want_params:
        args.append("--want-params")
    return " ".join(shlex.quote(a) for a in [*args, "--", *req.run_argv])


def runtime_env(req: LaunchRequest) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES)}
    env.update({
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{req.resource_timeout:g}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(req.env)
    if req.script_dir:
        # the user's script and whatever sits beside it (their models.py, data) is the working_dir,
        # so it runs on the cluster as it does here; podscale's own packages travel beside it
        own = [str(ROOT / p) for p in ("scaling", "launchers", "models", "podscale")]
        return {"working_dir": req.script_dir, "py_modules": own, "excludes": EXCLUDES, "env_vars": env}
    return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}


def parse_marks(logs: str) -> tuple[dict[str, Any] | None, bytes | None, dict[str, str] | None]:
    result = params = error = None
    for line in logs.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        elif line.startswith((PARAMS_MARK, PNG_MARK)):  # one binary payload per job: params or scale.png
            mark = PARAMS_MARK if line.startswith(PARAMS_MARK) else PNG_MARK
            params = base64.b64decode(line[len(mark):])
        elif line.startswith(ERROR_MARK):
            error = json.loads(line[len(ERROR_MARK):])
    return result, params, error


class _LogEcho:
    """Echo streamed log chunks line by line to stderr, hiding the marked result lines."""

    def __init__(self, out: Callable[[str], None]):
        self.buf = ""
        self.out = out

    def feed(self, chunk: str) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        for ln in lines:
            if not ln.startswith((RESULT_MARK, PARAMS_MARK, ERROR_MARK, PNG_MARK)):
                self.out(ln)

    def close(self) -> None:
        if self.buf and not self.buf.startswith((RESULT_MARK, PARAMS_MARK, ERROR_MARK, PNG_MARK)):
            self.out(self.buf)
        self.buf = ""


SUBMIT_RETRY_S = 60.0
"""How long a submission is retried while the head's job agent is still starting."""


def _client(address: str):
    import logging

    from ray.job_submission import JobSubmissionClient

    # packaging chatter ("uploading package", default excludes) is not the user's business
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("ray._private.runtime_env", "ray.dashboard")):
            logging.getLogger(name).setLevel(logging.ERROR)

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection errors of every kind become one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFailed(f"cannot reach the Ray job server at {address}: {first[:300]}") from None


def cluster_address(explicit: str | None) -> str | None:
    """``--address``, else ``RAY_ADDRESS`` as Ray's own ``ray job`` CLI reads it; None = no cluster named."""
    return explicit or os.environ.get("RAY_ADDRESS") or None


def submit(req: LaunchRequest, address: str) -> tuple[Any, str]:
    """Submit the job and return (client, submission id) without waiting for it."""
    client = _client(address)
    job_id = f"podscale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # a head that has just started may not have its job agent up yet ("No available agent to submit
    # job, please try again later"): retry that one answer for a bounded time, nothing else
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint(req), submission_id=job_id, runtime_env=runtime_env(req))
            break
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "No available agent" in first and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise RunFailed(f"the Ray job server at {address} refused the job: {first[:300]}") from None
    return client, job_id


def submit_and_wait(req: LaunchRequest, address: str, echo: Callable[[str], None] | None = None) -> JobOutcome:
    client, job_id = submit(req, address)
    try:
        t0 = time.monotonic()
        _follow(client, job_id, echo, req.job_timeout)
        # after a followed log ends the job is (nearly) done; unfollowed, the wait is the job itself
        left = None if req.job_timeout is None else max(1.0, req.job_timeout - (time.monotonic() - t0))
        status = _wait_terminal(client, job_id, 60.0 if echo is not None and left is None else left)
    except BaseException:
        try:
            client.stop_job(job_id)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        raise
    logs = client.get_job_logs(job_id)
    result, params, error = parse_marks(logs)
    return JobOutcome(job_id, status, result, params, error, logs)


def _follow(client: Any, job_id: str, echo: Callable[[str], None] | None, timeout: float | None) -> None:
    if echo is None:
        return
    le = _LogEcho(echo)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            le.feed(chunk)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout))
    except asyncio.TimeoutError:
        raise RunFailed(f"Ray job {job_id} did not finish within --job-timeout {timeout:g}s; stopped it") from None
    finally:
        le.close()


def _wait_terminal(client: Any, job_id: str, timeout: float | None) -> str:
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    while True:
        st = client.get_job_status(job_id)
        status = str(getattr(st, "value", st))
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise RunFailed(f"Ray job {job_id} still {status} after {timeout:g}s (--job-timeout); stopped it")
        time.sleep(0.5)


def launch(req: LaunchRequest, echo: Callable[[str], None] | None = None) -> JobOutcome:
    """Run one job: on ``req.address``, or on a private head started (and stopped) for it."""
    if req.address is not None:
        return _checked(submit_and_wait(req, req.address, echo))
    from launchers.ray_head import start_head

    head = start_head(num_cpus=req.num_cpus or max(os.cpu_count() or 1, 2))
    try:
        return _checked(submit_and_wait(req, head.address, echo))
    finally:
        head.stop()


def _checked(out: JobOutcome) -> JobOutcome:
    if out.error is not None:
        cls = UsageError if out.error.get("kind") == "usage" else RunFailed
        raise cls(out.error.get("message", "unknown error"))
    if out.status != "SUCCEEDED" or out.result is None:
        tail = [ln for ln in out.logs.strip().splitlines() if ln.strip()][-3:]
        raise RunFailed(f"Ray job {out.job_id} ended {out.status} without a result; last log lines: {' | '.join(tail)[:500]}")
    return out


# ---- the job lifecycle after ``launch --no-wait``: status, logs, stop ---------------------------


def job_client(address: str | None) -> tuple[Any, str]:
    addr = cluster_address(address)
    if addr is None:
        raise UsageError("no Ray cluster named: give --address http://HEAD:8265 or set RAY_ADDRESS (as for `ray job`)")
    return _client(addr), addr


def _asked(what: str, job_id: str, addr: str, fn: Callable[[], Any]) -> Any:
    """One Jobs API call; an unknown id is bad input (exit 2), anything else one line (exit 3)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError with the HTTP answer inside
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "404" in first or "does not exist" in first:
            raise UsageError(f"no job {job_id!r} on the Ray cluster at {addr} (`ray job list --address {addr}` lists its jobs)") from None
        raise RunFailed(f"could not {what} job {job_id} at {addr}: {first[:300]}") from None


def job_status(client: Any, job_id: str, addr: str) -> str:
    st = _asked("ask the status of", job_id, addr, lambda: client.get_job_status(job_id))
    return str(getattr(st, "value", st))


def job_logs(client: Any, job_id: str, addr: str) -> str:
    """The job's log as a user reads it: the marked result lines stay out (they are data)."""
    logs = _asked("read the log of", job_id, addr, lambda: client.get_job_logs(job_id))
    out: list[str] = []
    _LogEcho(out.append).feed(logs + "\n")
    return "\n".join(out)


def job_outcome(client: Any, job_id: str, addr: str) -> JobOutcome:
    status = job_status(client, job_id, addr)
    logs = _asked("read the log of", job_id, addr, lambda: client.get_job_logs(job_id))
    result, params, error = parse_marks(logs)
    return JobOutcome(job_id, status, result, params, error, logs)


def follow_logs(client: Any, job_id: str, addr: str, echo: Callable[[str], None]) -> None:
    _asked("ask the status of", job_id, addr, lambda: client.get_job_status(job_id))  # an unknown id: one line
    _follow(client, job_id, echo, None)


def job_stop(client: Any, job_id: str, addr: str, wait_s: float = 30.0) -> str:
    """Stop the job and wait (bounded) for Ray to report it ended; its status then."""
    status = job_status(client, job_id, addr)
    if status in TERMINAL:
        return status
    _asked("stop", job_id, addr, lambda: client.stop_job(job_id))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status = job_status(client, job_id, addr)
        if status in TERMINAL:
            return status
        time.sleep(0.3)
    raise RunFailed(f"Ray job {job_id} still {status} {wait_s:g}s after it was told to stop")
