"""``podscale launch -- run ...`` (a run as a Ray job) and ``podscale cluster validate FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaling.errors import UsageError

TRAIN_HELP = ("how the job trains: ray = Ray Train TorchTrainer workers (torch-ddp) or one Ray actor per "
              "JAX process (jax-*), spread over the cluster; local = the local launcher on the job's node; "
              "auto (default) = ray where supported")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run on a Ray cluster (or a private local one) through the Ray Jobs API",
                       description="podscale launch [options] -- run [run flags]")
    p.add_argument("--address", default=None,
                   help="Ray job server: http://127.0.0.1:8265 (e.g. through an SSH tunnel) or auto; default: "
                        "$RAY_ADDRESS as for `ray job`, else a private loopback-only Ray head started for this job and stopped after")
    p.add_argument("--no-wait", action="store_true", dest="no_wait",
                   help="submit, print the job's id and return; then podscale job status|logs|stop ID "
                        "(needs a cluster that outlives this command: --address or RAY_ADDRESS)")
    p.add_argument("--train", choices=("auto", "ray", "local"), default="auto", help=TRAIN_HELP)
    p.add_argument("--max-failures", type=int, default=0, dest="max_failures",
                   help="worker-group restarts allowed, each from the last checkpoint (default 0)")
    p.add_argument("--resource-timeout", type=float, default=60.0, dest="resource_timeout",
                   help="seconds to wait for the cluster to fit the workers before failing (default 60)")
    p.add_argument("--num-cpus", type=int, default=None, dest="num_cpus",
                   help="logical CPUs of the private head (default: max(cores, devices + 1))")
    p.add_argument("--python", default=None,
                   help="the cluster's Python with podscale installed (default: this interpreter on a local head, else python)")
    p.add_argument("--job-timeout", type=float, default=None, dest="job_timeout", help="stop the job after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no table, no job log on the console")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- run [flags of podscale run]")
    p.set_defaults(func=main_launch)

    c = sub.add_parser("cluster", help="Ray cluster-launcher YAMLs: check one offline")
    csub = c.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND (validate)", required=True, parser_class=type(p))
    v = csub.add_parser("validate", help="validate a cluster YAML offline and print its peak PFLOPS")
    v.add_argument("file", help="cluster YAML (see cluster/)")
    v.set_defaults(func=main_validate)


def main_launch(args: argparse.Namespace) -> int:
    from launchers.ray_cluster import LaunchRequest, launch
    from launchers.ray_job import parse_run_args

    rest = list(args.rest)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise UsageError("nothing to launch: use podscale launch [options] -- run [run flags]")
    if rest[0] == "scale":
        if args.no_wait:
            raise UsageError("--no-wait submits `run` jobs; a scale sweep's plot and table come back only to a waiting launch")
        return _launch_scale(args, rest)
    if args.max_failures < -1:
        raise UsageError(f"invalid --max-failures {args.max_failures}: must be >= 0 (or -1 for unlimited)")
    if not args.resource_timeout > 0:
        raise UsageError(f"invalid --resource-timeout {args.resource_timeout}: must be positive seconds")
    cfg = parse_run_args(rest)  # bad run flags fail here, before any Ray starts
    from launchers.ray_cluster import cluster_address

    address = cluster_address(args.address)
    if args.no_wait:
        if address is None:
            raise UsageError("--no-wait needs a cluster that outlives this command: give --address http://HEAD:8265 or set RAY_ADDRESS")
        if cfg.json_path or cfg.params_out:
            raise UsageError("--json/--params-out with --no-wait: nothing comes back to this command; "
                             "write the result later with `podscale job status ID --json PATH`")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UsageError(f"invalid --num-cpus {args.num_cpus}: must be a positive integer")
    import os

    num_cpus = args.num_cpus or max(os.cpu_count() or 1, cfg.devices + 1)
    script_dir = None
    if cfg.script is not None:
        from launchers.cmd_run import preflight

        preflight(cfg)  # a missing script fails here, not on the cluster
        script = Path(cfg.script).resolve()
        script_dir = str(script.parent)
        # on the cluster the script's directory is the job's working directory
        rest = [script.name if a == cfg.script else a for a in rest]
    req = LaunchRequest(run_argv=rest, address=address, train=args.train, max_failures=args.max_failures,
                        resource_timeout=args.resource_timeout, python=args.python, num_cpus=num_cpus,
                        want_params=cfg.params_out is not None, job_timeout=args.job_timeout, script_dir=script_dir)
    if args.no_wait:
        from launchers.ray_cluster import submit

        _, job_id = submit(req, address)
        print(job_id)
        if not args.quiet:
            print(f"podscale: submitted Ray job {job_id} to {address}; podscale job status|logs|stop {job_id}", file=sys.stderr)
        return 0
    echo = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    out = launch(req, echo)
    from scaling.run import write_outputs

    for i, r in enumerate(out.result.get("restarts") or [], 1):  # shown even with --quiet: the run was not clean
        print(f"podscale: restart {i}: on node {r['node']}: {r['cause']}; went on from checkpoint step {r['step']}",
              file=sys.stderr, flush=True)
    write_outputs(out.result, cfg)
    if cfg.params_out and out.params_npz is not None:
        from scaling.checkpoint import write_atomic

        write_atomic(cfg.params_out, lambda f: f.write(out.params_npz))
    if not args.quiet:
        from rich.console import Console

        from scaling.report import print_run

        print_run(out.result, Console())
    return 0


def _launch_scale(args: argparse.Namespace, rest: list[str]) -> int:
    """The sweep runs on the job's node; scale.json and scale.png come back into --out here."""
    import json
    import os

    from launchers.ray_cluster import LaunchRequest, launch
    from scaling.checkpoint import write_atomic

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default="out/scale")
    p.add_argument("--devices", default="1,2,4,8")
    known, _ = p.parse_known_args(rest[1:])
    try:
        most = max(int(x) for x in known.devices.split(","))
    except ValueError:
        raise UsageError(f"invalid --devices {known.devices!r}: expected a comma list of integers (e.g. 1,2,4,8)") from None
    from launchers.ray_cluster import cluster_address

    req = LaunchRequest(run_argv=rest, address=cluster_address(args.address), train="local", max_failures=0,
                        resource_timeout=args.resource_timeout, python=args.python,
                        num_cpus=args.num_cpus or max(os.cpu_count() or 1, most + 1), job_timeout=args.job_timeout)
    out = launch(req, None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)))
    d = Path(known.out)
    write_atomic(d / "scale.json", lambda f: f.write(json.dumps(out.result, indent=2).encode()))
    if out.params_npz is not None:
        write_atomic(d / "scale.png", lambda f: f.write(out.params_npz))
    print(f"wrote {d / 'scale.json'}" + (f", {d / 'scale.png'}" if out.params_npz is not None else "") + f" (Ray job {out.job_id})")
    return 0


def main_validate(args: argparse.Namespace) -> int:
    from launchers.ray_clusterfile import validate_file

    report = validate_file(Path(args.file))
    print(report.summary())
    return 0
