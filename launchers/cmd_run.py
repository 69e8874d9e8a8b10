"""``podscale run``: one training run on this host, reported as table, JSON and TensorBoard."""

from __future__ import annotations

import argparse

from rich.console import Console

from launchers import cli
from launchers.local import run_local
from scaling.backends import get_backend
from scaling.data import load_dataset, load_init
from models.spec import get_spec
from scaling.report import print_run
from scaling.run import finish, write_outputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train one data-parallel run and report its throughput")
    cli.add_run_flags(p)
    p.add_argument("--quiet", action="store_true", help="no table on the console")
    p.set_defaults(func=main)


def preflight(cfg) -> None:
    """Check everything a user can get wrong before any process starts (exit 2, one line)."""
    get_backend(cfg.backend).validate(cfg)
    spec = get_spec(cfg.model, **cfg.model_opts)
    load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    load_init(spec, cfg.init, cfg.seed)


def main(args: argparse.Namespace) -> int:
    quiet = getattr(args, "quiet", False)
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet")})
    cfg = cli.config_from_args(ns)
    preflight(cfg)
    raw = run_local(cfg)
    result = finish(cfg, raw)
    write_outputs(result, cfg)
    if not quiet:
        print_run(result, Console())
    return 0
