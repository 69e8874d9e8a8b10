"""``podscale job status|logs|stop ID``: a Ray job started by ``podscale launch --no-wait``, the
lifecycle users know from ``ray job``. The cluster is ``--address`` or ``RAY_ADDRESS``."""

from __future__ import annotations

import argparse
import sys

from scaling.errors import RunFailed

ADDRESS_HELP = "Ray job server, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="a Ray job from `podscale launch --no-wait`: status, logs, stop",
                       description="podscale job status|logs|stop ID [--address URL]")
    jsub = p.add_subparsers(dest="job_command", metavar="SUBCOMMAND (status, logs, stop)", required=True, parser_class=type(p))
    st = jsub.add_parser("status", help="the job's status; once it succeeded, its result (--json PATH writes it)")
    st.add_argument("--json", default=None, dest="json_path", metavar="PATH",
                    help="write the job's result JSON here (the keys of podscale run --json); exit 3 if it has none yet")
    lg = jsub.add_parser("logs", help="the job's log, without podscale's marked result lines")
    lg.add_argument("--follow", action="store_true", help="stream the log until the job ends")
    sp = jsub.add_parser("stop", help="stop the job and wait until Ray reports it ended")
    sp.add_argument("--wait", type=float, default=30.0, help="seconds to wait for it to end (default 30)")
    for q in (st, lg, sp):
        q.add_argument("job_id", metavar="ID", help="the id `podscale launch --no-wait` printed")
        q.add_argument("--address", default=None, help=ADDRESS_HELP)
    st.set_defaults(func=main_status)
    lg.set_defaults(func=main_logs)
    sp.set_defaults(func=main_stop)


def main_status(args: argparse.Namespace) -> int:
    from launchers.ray_cluster import job_client, job_outcome
    from scaling.paths import writable_file

    if args.json_path:
        writable_file("--json", args.json_path)
    client, addr = job_client(args.address)
    out = job_outcome(client, args.job_id, addr)
    line = f"{out.job_id}: {out.status}"
    if out.error:
        line += f" ({out.error.get('message', '')})"
    elif out.result is not None:
        r = out.result
        step = r.get("step_time_s")
        line += f" ({r.get('backend')} x {r.get('devices')}, {r.get('steps')} steps" + \
                (f", median step {step * 1e3:.3g} ms" if step else "") + ")"
    print(line)
    if args.json_path:
        if out.result is None:
            raise RunFailed(f"job {out.job_id} is {out.status} and has no result to write" +
                            (f": {out.error.get('message')}" if out.error else ""))
        from scaling.run import write_json

        write_json(args.json_path, out.result)
        print(f"wrote {args.json_path} (result JSON)")
    return 0


def main_logs(args: argparse.Namespace) -> int:
    from launchers.ray_cluster import follow_logs, job_client, job_logs

    client, addr = job_client(args.address)
    if args.follow:
        follow_logs(client, args.job_id, addr, lambda ln: print(ln, flush=True))
    else:
        text = job_logs(client, args.job_id, addr)
        sys.stdout.write(text + ("\n" if text and not text.endswith("\n") else ""))
    return 0


def main_stop(args: argparse.Namespace) -> int:
    from launchers.ray_cluster import job_client, job_stop
    from scaling.errors import UsageError

    if not args.wait > 0:
        raise UsageError(f"invalid --wait {args.wait}: must be positive seconds")
    client, addr = job_client(args.address)
    print(f"{args.job_id}: {job_stop(client, args.job_id, addr, args.wait)}")
    return 0


__all__ = ["register"]
