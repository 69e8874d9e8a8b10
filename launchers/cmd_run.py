"""``podscale run``: one training run on this host, reported as table, JSON and TensorBoard."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from launchers import capacity, flags
from scaling import paths
from scaling.errors import Diverged, UsageError
from scaling.world import run_local
from scaling.backends import get_backend
from scaling.data import load_dataset, load_init
from models.spec import get_spec
from scaling.report import print_run
from scaling.run import finish, write_diverged, write_outputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train one data-parallel run (the zoo's model or your script) and report its throughput",
                       usage="podscale run [train.py] [flags] [-- script args]",
                       epilog=flags.EXIT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_run_flags(p)
    p.add_argument("--quiet", action="store_true", help="no table on the console")
    p.set_defaults(func=main)


def preflight(cfg) -> None:
    """Check everything a user can get wrong before any process starts (exit 2, one line)."""
    check_environment()
    get_backend(cfg.backend).validate(cfg)
    check_outputs(cfg)
    capacity.check_run(cfg)
    if cfg.script is not None:
        p = Path(cfg.script)
        if not p.is_file():
            raise UsageError(f"script {cfg.script!r}: no such file (give the path of your training script, e.g. examples/digits_cnn.py)")
        return
    spec = get_spec(cfg.model, **cfg.model_opts)
    load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    load_init(spec, cfg.init, cfg.seed)


def check_environment() -> None:
    """The environment variables podscale reads, checked here rather than in every rank."""
    import os

    from scaling import fault
    from scaling.backends import gloo_io
    from scaling.backends.jax_env import step_kind

    try:
        fault.parse(os.environ.get("PODSCALE_FAULT"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    step_kind()
    gloo_io.setting()  # every backend's gloo: torch-ddp, torch-xla under torchrun, JAX's processes
    if os.environ.get("PODSCALE_CACHE_DIR"):
        paths.writable_dir("PODSCALE_CACHE_DIR", os.environ["PODSCALE_CACHE_DIR"])


def check_outputs(cfg) -> None:
    """Every path the run will write is writable now, not after the training it would lose."""
    for flag, path in (("--json", cfg.json_path), ("--params-out", cfg.params_out)):
        if path is not None:
            paths.writable_file(flag, path)
    for flag, path in (("--logdir", cfg.logdir), ("--checkpoint-dir", cfg.checkpoint_dir)):
        if path is not None:
            paths.writable_dir(flag, path)


def main(args: argparse.Namespace) -> int:
    quiet = getattr(args, "quiet", False)
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet")})
    cfg = flags.config_from_args(ns).with_run_name()
    preflight(cfg)
    try:
        raw = run_local(cfg)
    except Diverged as e:
        write_diverged(cfg, e)
        raise
    result = finish(cfg, raw)
    write_outputs(result, cfg)
    if not quiet:
        print_run(result, Console())
    for line in written(cfg):
        print(line)
    return 0


def written(cfg) -> list[str]:
    """One "wrote ..." line per output, so nobody has to guess where the results went."""
    out = []
    if cfg.json_path:
        out.append(f"wrote {cfg.json_path} (result JSON)")
    if cfg.params_out:
        out.append(f"wrote {cfg.params_out} (final parameters, .npz by canonical name)")
    if cfg.run_logdir is not None:
        out.append(f"wrote {cfg.run_logdir} (TensorBoard: tensorboard --logdir {cfg.logdir} --host 127.0.0.1)")
    if cfg.checkpoint_dir:
        out.append(f"wrote {cfg.checkpoint_dir} (checkpoints; continue with --resume)")
    return out
