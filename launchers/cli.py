"""``podscale``: one CLI for every backend, launcher and report.

Each subcommand lives in its own module exposing ``register(subparsers)`` (which sets
``func``); this file only wires them up and turns the two error classes into exit codes
(2 = bad input, 3 = the run died), each as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

from scaling.config import RunConfig, load_config_file
from scaling.errors import RunFailed, UsageError

#: modules that add subcommands; other issues append theirs
COMMAND_MODULES = [
    "launchers.cmd_run",
    "launchers.cmd_hardware",
    "launchers.cmd_scale",
    "launchers.cmd_launch",
    "launchers.cmd_models",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2 (no usage dump)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The RunConfig flags, shared by ``run`` and ``launch -- run``. Defaults are SUPPRESSed so that
    only flags the user typed override ``--config``."""
    S = argparse.SUPPRESS
    p.add_argument("--config", default=S, help="TOML/YAML file of RunConfig fields; flags override it")
    p.add_argument("--backend", default=S, help="torch-ddp | jax-pmap | jax-sharded | torch-xla (default torch-ddp)")
    p.add_argument("--model", default=S, help="model name (default mlp; podscale models lists them)")
    p.add_argument("--devices", type=int, default=S, help="global count of framework-visible devices (default 1)")
    p.add_argument("--processes", type=int, default=S, help="processes the devices are spread over (jax: multi-host shape)")
    p.add_argument("--global-batch", type=int, default=S, dest="global_batch", help="samples per step over all devices (default 64)")
    p.add_argument("--steps", type=int, default=S, help="optimizer steps (default 20)")
    p.add_argument("--untimed-steps", type=int, default=S, dest="untimed_steps", help="first steps trained but not timed (default 2)")
    p.add_argument("--lr", type=float, default=S, help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=S)
    p.add_argument("--loss-reduction", choices=("mean", "sum"), default=S, dest="loss_reduction")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=S)
    p.add_argument("--data", default=S, help="PATH.npz with arrays x and y (default: synthetic from --seed)")
    p.add_argument("--init", default=S, help="PATH.npz of initial parameters by canonical name")
    p.add_argument("--model-opt", action="append", default=S, dest="model_opt", metavar="KEY=VALUE",
                   help="model hyper-parameter, repeatable (e.g. hidden=100, bias=false, activation=sigmoid)")
    p.add_argument("--logdir", default=S, help="TensorBoard log directory")
    p.add_argument("--json", default=S, dest="json_path", metavar="PATH", help="write the result JSON here")
    p.add_argument("--params-out", default=S, dest="params_out", metavar="PATH", help="write final params (.npz) here")
    p.add_argument("--step-timeout", type=float, default=S, dest="step_timeout", help="seconds without progress before the run is killed (exit 3)")
    p.add_argument("--startup-timeout", type=float, default=S, dest="startup_timeout")
    p.add_argument("--checkpoint-dir", default=S, dest="checkpoint_dir")
    p.add_argument("--checkpoint-every", type=int, default=S, dest="checkpoint_every")
    p.add_argument("--resume", action="store_true", default=S, help="continue from the newest checkpoint")
    p.add_argument("--hardware", default=S, help="catalog id of the hardware (default: detected)")
    p.add_argument("--compile", action="store_true", default=S, help="torch.compile the model (torch backends)")
    p.add_argument("--sync-bn", action="store_true", default=S, dest="sync_bn", help="cross-replica batch-norm statistics")
    p.add_argument("--launcher", choices=("spmd", "torchrun", "xmp"), default=S, help="torch-xla: how processes start")


def parse_model_opts(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"invalid --model-opt {it!r}: expected KEY=VALUE (e.g. hidden=100)")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    d = vars(ns).copy()
    fields: dict[str, Any] = {}
    if "config" in d:
        fields.update(load_config_file(d.pop("config")))
    opts = d.pop("model_opt", None)
    for k in list(d):
        if k in RunConfig.__dataclass_fields__:
            fields[k] = d[k]
    if opts:
        fields["model_opts"] = {**fields.get("model_opts", {}), **parse_model_opts(opts)}
    return RunConfig.from_dict(fields)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="podscale", description="Data-parallel training that tells you, in numbers, how well it scaled.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # that subcommand has not landed yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"podscale {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except RunFailed as e:
        print(f"podscale {args.command}: run failed: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("podscale: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        if type(e).__name__ == "Terminated":  # launchers.local: SIGTERM, ranks already killed
            print(f"podscale {args.command}: {e}; all ranks were killed", file=sys.stderr)
            return 143
        raise


if __name__ == "__main__":
    sys.exit(main())
