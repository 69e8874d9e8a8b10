"""The flags ``podscale run`` and ``podscale launch -- run`` share, and the parser every subcommand uses.

Kept apart from ``cli`` (which imports every subcommand) so that the subcommands can use them
without importing the module that imports them.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from scaling.config import RunConfig, load_config_file
from scaling.errors import EXIT_CODES, UsageError, did_you_mean

#: the exit-code table every --help ends with
EXIT_EPILOG = "exit codes:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2 (no usage dump), with the nearest
    valid spelling and the subcommand's own ``--help``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            message += did_you_mean(m.group(1), re.findall(r"'([^']*)'", m.group(2)) or m.group(2).split(", "))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unknown_flags(self, extra: list[str]) -> Any:
        """Arguments this (sub)command does not take, each with its nearest flag."""
        flags = [o for o in self._option_string_actions if o.startswith("--")]
        hints = "".join(did_you_mean(a.split("=")[0], flags) for a in extra if a.startswith("-"))
        self.error(f"unrecognized arguments: {' '.join(extra)}{hints}")


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
    p.add_argument("--probe-steps", type=int, default=S, dest="probe_steps",
                   help="rounds of probes of where the time goes, after training (default: one per 30 steps, at most 10; 0 = none)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=S, help="default adam")
    p.add_argument("--loss-reduction", choices=("mean", "sum"), default=S, dest="loss_reduction")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=S)
    p.add_argument("--data", default=S, help="PATH.npz with arrays x and y, digits, or noise (pure-noise targets); default: synthetic "
                   "targets of a fixed random teacher network, from --seed")
    p.add_argument("--init", default=S, help="PATH.npz of initial parameters by canonical name")
    p.add_argument("--model-opt", action="append", default=S, dest="model_opt", metavar="KEY=VALUE",
                   help="model hyper-parameter, repeatable (e.g. hidden=100, bias=false, activation=sigmoid)")
    p.add_argument("--logdir", default=S, help="TensorBoard log directory (each run in its own subfolder)")
    p.add_argument("--run-name", default=S, dest="run_name",
                   help="this run's subfolder of --logdir (default: backend-model-Ndev-timestamp)")
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
    p.add_argument("--sharding", choices=("none", "optimizer", "full"), default=S,
                   help="split the training state over the devices too: optimizer = gradients + optimizer state, "
                        "full = parameters too (FSDP2; torch-ddp). Default none")
    p.add_argument("--launcher", choices=("spmd", "torchrun", "xmp"), default=S, help="torch-xla: how processes start")
    p.add_argument("script", nargs="?", default=S, help="your training script (run as __main__ in every process); "
                   "its own arguments go after --")


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
