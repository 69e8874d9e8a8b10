"""The entrypoint of a ``podscale launch`` job on the Ray cluster: ``python -m launchers.ray_job``.

It runs where Ray puts the job's driver (usually the head node), so its results cannot go to a
path on the user's machine: they come back as marked lines in the job's log, which the client
reads through the Jobs API. One line each, so a log streamed from any node carries them whole:

- ``PODSCALE_RESULT_JSON {...}``: the result JSON, the keys of ``podscale run --json`` and
  ``restarts``: one ``{node, step, cause}`` per time the run lost a node or a worker and went on
  from checkpoint ``step`` (``[]`` for a run that never restarted);
- ``PODSCALE_PARAMS_NPZ <base64>``: the final parameters (only when the user asked --params-out);
- ``PODSCALE_ERROR {"kind": "usage"|"run", "message": ...}``: why it failed, for a one-line error
  and the right exit code on the client.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from scaling.errors import RunFailed, UsageError

RESULT_MARK = "PODSCALE_RESULT_JSON "
PARAMS_MARK = "PODSCALE_PARAMS_NPZ "
ERROR_MARK = "PODSCALE_ERROR "
PNG_MARK = "PODSCALE_SCALE_PNG "
TRAIN_MODES = ("auto", "ray", "local")
#: base64 of larger parameter files would swamp the job log; bigger ones stay on the cluster
MAX_PARAMS_BYTES = 64 * 2**20


def parse_run_args(argv: list[str]):
    """The ``run`` flags exactly as ``podscale run`` parses them (same parser, same errors)."""
    from launchers import flags

    if not argv or argv[0] != "run":
        raise UsageError(f"podscale launch runs 'run' jobs; got {argv[0] if argv else 'nothing'!r} after --")
    p = flags.OneLineParser(prog="podscale launch -- run", add_help=False)
    flags.add_run_flags(p)
    p.add_argument("--quiet", action="store_true")
    rest, script_args = argv[1:], []
    if "--" in rest:  # run train.py [flags] -- [the script's own arguments]
        cut = rest.index("--")
        rest, script_args = rest[:cut], rest[cut + 1 :]
    try:
        ns, extra = p.parse_known_args(rest)
    except SystemExit:
        raise UsageError("bad 'run' flags after -- (see podscale run --help)") from None
    if extra:
        raise UsageError(f"unknown 'run' flag(s) {' '.join(extra)} (see podscale run --help)")
    ns = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k != "quiet"})
    if script_args:
        ns.script_args = script_args
    return flags.config_from_args(ns)


def resolve_mode(mode: str, backend: str) -> str:
    """``auto``: Ray Train for torch-ddp, Ray actors for the JAX backends, ``local`` otherwise."""
    if mode != "auto":
        return mode
    if backend == "torch-ddp":
        return "ray"
    if backend.startswith("jax") and importlib.util.find_spec("launchers.ray_jax") is not None:
        return "ray"
    return "local"


def connect() -> None:
    """Join the job's cluster and pin every actor of this job to it.

    Ray Train's helper actors look the cluster up by scanning the host's processes when
    RAY_ADDRESS is unset, and fail ("multiple active Ray instances") on a host that runs more than
    one Ray; the job driver knows its cluster's address, so its actors get it too.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}}, log_to_driver=True)
    else:
        ray.init(log_to_driver=True)


def run_job(argv: list[str], mode: str, max_failures: int, resource_timeout: float) -> tuple[dict[str, Any], bytes | None]:
    from launchers.cmd_run import preflight
    from scaling.run import finish

    cfg = parse_run_args(argv)
    inner = cfg.replace(json_path=None, params_out=None, logdir=None)
    preflight(inner)
    if cfg.script is not None:
        # a user's script starts its world on the job's node, as `podscale run train.py` does there;
        # Ray Train and the JAX actors run the zoo's own loops
        if mode == "ray":
            raise UsageError("--train ray runs the model zoo's loops; a script runs with --train local (the default for scripts)")
        mode = "local"
    mode = resolve_mode(mode, cfg.backend)
    params: bytes | None = None
    restarts: list[dict[str, Any]] = []
    if mode == "local":
        from scaling.world import run_local

        with tempfile.TemporaryDirectory(prefix="podscale-job-") as tmp:
            out = Path(tmp) / "final_params.npz"
            raw = run_local(inner.replace(params_out=str(out)))
            params = out.read_bytes() if out.exists() else None
    elif cfg.backend == "torch-ddp":
        from launchers.ray_train import run_torch

        connect()
        raw, params, restarts = run_torch(inner, max_failures, resource_timeout)
    elif cfg.backend.startswith("jax"):
        from launchers.ray_jax import run_jax

        connect()
        raw, params, restarts = run_jax(inner, max_failures, resource_timeout)
    else:
        raise UsageError(f"--train ray supports torch-ddp, jax-pmap and jax-sharded; for {cfg.backend!r} use --train local")
    return {**finish(cfg, raw), "restarts": restarts}, params


def run_scale(argv: list[str]) -> tuple[dict[str, Any], bytes | None]:
    """``podscale scale`` on the job's node (its sweep starts local runs there); the outputs go to a
    private directory and come back through the log: scale.json as the result, scale.png beside it.
    Its UsageError / RunFailed reach ``main`` as they are, so the client sees the sweep's own line."""
    from launchers import cmd_scale, flags

    parser = flags.OneLineParser(prog="podscale")
    cmd_scale.register(parser.add_subparsers(dest="command", required=True, parser_class=flags.OneLineParser))
    with tempfile.TemporaryDirectory(prefix="podscale-scale-") as tmp:
        args = parser.parse_args(["scale", *argv[1:], "--out", tmp, "--logdir", str(Path(tmp) / "runs")])
        code = int(args.func(args) or 0)
        doc = Path(tmp) / "scale.json"
        if code != 0 or not doc.exists():
            raise RunFailed(f"podscale scale on the cluster exited with code {code} (its message is in the job log above)")
        png = Path(tmp) / "scale.png"
        return json.loads(doc.read_text()), png.read_bytes() if png.exists() else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="launchers.ray_job")
    p.add_argument("--train", choices=TRAIN_MODES, default="auto")
    p.add_argument("--max-failures", type=int, default=0)
    p.add_argument("--resource-timeout", type=float, default=60.0)
    p.add_argument("--want-params", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    try:
        if rest[:1] == ["scale"]:
            result, png = run_scale(rest)
            if png is not None:
                print(PNG_MARK + base64.b64encode(png).decode("ascii"), flush=True)
            print(RESULT_MARK + json.dumps(result), flush=True)
            return 0
        result, params = run_job(rest, a.train, a.max_failures, a.resource_timeout)
    except (UsageError, RunFailed) as e:
        kind = "usage" if isinstance(e, UsageError) else "run"
        print(ERROR_MARK + json.dumps({"kind": kind, "message": str(e)}), flush=True)
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - anything else is still one line on the client
        if os.environ.get("PODSCALE_DEBUG"):
            traceback.print_exc()
        print(ERROR_MARK + json.dumps({"kind": "run", "message": f"{type(e).__name__}: {e}".splitlines()[0]}), flush=True)
        return 3
    if a.want_params and params is not None:
        if len(params) <= MAX_PARAMS_BYTES:
            print(PARAMS_MARK + base64.b64encode(params).decode("ascii"), flush=True)
        else:
            print(f"podscale: final params ({len(params)} bytes) are too large to return through the job log", file=sys.stderr)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo/Ray teardown can abort an otherwise clean exit (PLATFORM_NOTES)
