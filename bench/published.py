"""Predicted vs published: the throughput model on the public calibration set.

    .venv/bin/python bench/published.py          # table + median and max error
    .venv/bin/python bench/published.py --json

Two sets, each printed with its own median and max: the calibration set
(scaling/throughput/published_runs.toml, which the fitted values come from) and the held-out set
(published_heldout.toml: never fitted on, the check that the rule generalises). Known misses are
printed with their reason, never left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaling.throughput import validation  # noqa: E402


def _pct(x: float | None, signed: bool = True) -> str:
    return "" if x is None else (f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%")


def _table(name: str, results: list[validation.Result]) -> None:
    s = validation.summary(results)
    print(f"{name} set ({validation.SETS[name].name})")
    print(f"{'case':<28} {'published':>10} {'predicted':>10} {'error':>7}   {'pub eff':>7} {'pred eff':>8} {'diff':>6}  ok")
    for r in results:
        pub = f"{r.published_samples_per_s:,.0f}" if r.published_samples_per_s else ""
        diff = "" if r.efficiency_error is None else f"{r.efficiency_error * 100:+.1f}"
        ok = "yes" if r.within else ("known miss" if r.known_miss else "NO")
        print(f"{r.id:<28} {pub:>10} {r.predicted_samples_per_s:>10,.0f} {_pct(r.throughput_error):>7}   "
              f"{_pct(r.published_efficiency, False):>7} {_pct(r.predicted_efficiency, False):>8} {diff:>6}  {ok}")
    print(f"\n{name}: throughput |error|: median {s['throughput_median'] * 100:.1f}%, max {s['throughput_max'] * 100:.1f}% "
          f"(target {validation.THROUGHPUT_TARGET * 100:.0f}%)")
    print(f"{name}: efficiency |error|: median {s['efficiency_median'] * 100:.1f} points, max {s['efficiency_max'] * 100:.1f} points "
          f"(target {validation.EFFICIENCY_TARGET * 100:.0f})")
    for r in results:
        if r.known_miss:
            print(f"known miss {r.id}: {r.known_miss}")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sets = {name: validation.evaluate_all(path) for name, path in validation.SETS.items()}
    if args.json:
        print(json.dumps({name: {"cases": [dict(r.__dict__, throughput_error=r.throughput_error, efficiency_error=r.efficiency_error,
                                                within=r.within) for r in results], "summary": validation.summary(results)}
                          for name, results in sets.items()}, indent=1))
        return 0
    for name, results in sets.items():
        _table(name, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
