"""`python -m parallel.bench.costmodel --fit ... --check ...`: fit, check, save, load, --paper."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from ..config import parse_bytes
from .features import *  # noqa: F401,F403
from .fit import CostModel, InputError, Measurement, UnevenLayout, Undetermined, read_results
from .paper import paper_table

# -- CLI ---------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"costmodel: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m parallel.bench.costmodel",
                 description="Fit the alpha-beta-gamma cost model to results.csv files and check it on others.")
    ap.add_argument("--fit", nargs="+", metavar="CSV", help="results.csv files to fit the parameters on")
    ap.add_argument("--check", nargs="+", metavar="CSV", help="results.csv files to predict and compare")
    ap.add_argument("--save", metavar="JSON", help="write the fitted parameters here")
    ap.add_argument("--params", metavar="JSON", help="load parameters written by --save instead of fitting")
    ap.add_argument("--ops", help="comma list: only these ops (default all)")
    ap.add_argument("--algorithms", help="comma list: only these algorithms (default all)")
    ap.add_argument("--min-bytes", default="0", help="leave out rows smaller than this (K/M/G binary), default 0")
    ap.add_argument("--paper", action="store_true",
                    help="print the all-reduce busbw table predicted from published H100 / NDR figures")
    return ap


def _choices(flag: str, value: str | None, allowed) -> set[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise InputError(f"{flag} is empty; choose from {', '.join(allowed)}")
    for v in items:
        if v not in allowed:
            raise InputError(f"{flag}: unknown {flag.strip('-').rstrip('s')} {v!r}; choose from {', '.join(allowed)}")
    return set(items)


def _load_rows(paths, flag, ops, algorithms, min_bytes) -> tuple[list[Measurement], list[str]]:
    rows, notes = [], []
    for path in paths:
        got, why = read_results(path, flag)
        notes += why
        rows += [m for m in got if (ops is None or m.op in ops) and (algorithms is None or m.algorithm in algorithms)
                 and m.size_bytes >= min_bytes]
    return rows, notes


def _check(model: CostModel, rows: list[Measurement]) -> tuple[list[str], bool]:
    lines = [f"#{'op':>14} {'algorithm':>9} {'layout':>7} {'size_B':>12} {'measured_us':>12} "
             f"{'predicted_us':>13} {'error':>8}"]
    done, refused, skipped = [], Counter(), 0
    for m in rows:
        if m.world_size == 1:
            skipped += 1
            continue
        try:
            t = model.predict(m.op, m.algorithm, m.size_bytes, m.nodes, m.ranks_per_node, m.dtype)
        except Undetermined as e:
            refused[(m.algorithm, m.op, m.layout, str(e))] += 1
            continue
        except ValueError as e:  # an algorithm / op pair the model has no formula for
            refused[(m.algorithm, m.op, m.layout, str(e))] += 1
            continue
        err = (t - m.seconds) / m.seconds * 100
        done.append((m, t, err))
        lines.append(f" {m.op:>14} {m.algorithm:>9} {m.layout:>7} {m.size_bytes:>12} {m.seconds * 1e6:>12.1f} "
                     f"{t * 1e6:>13.1f} {err:>+7.1f}%")
    if skipped:
        lines.append(f"# left out {skipped} row(s) of a world of one (nothing moves)")
    for (algorithm, op, layout, why), c in sorted(refused.items()):
        lines.append(f"# refused {c} row(s) of {algorithm} {op} on {layout}: {why}")
    for m, t, err in sorted(done, key=lambda d: -abs(d[2]))[:5]:
        lines.append(f"# worst: {m.op} {m.algorithm} {m.layout} {m.size_bytes} B: measured {m.seconds * 1e6:.1f} us, "
                     f"predicted {t * 1e6:.1f} us ({err:+.1f}%)")
    med = float(np.median([abs(d[2]) for d in done])) if done else float("nan")
    lines.append(f"median abs error {med:.1f}% over {len(done)} rows")
    return lines, bool(done)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.paper:
            if args.fit or args.check or args.params or args.save:
                raise InputError("--paper takes no other options")
            print(paper_table())
            return 0
        if args.fit and args.params:
            raise InputError("--fit and --params exclude each other (fit, or load fitted parameters)")
        if not args.fit and not args.params:
            raise InputError("give --fit CSV... (or --params JSON), or --paper")
        ops = _choices("--ops", args.ops, OPS)
        algorithms = _choices("--algorithms", args.algorithms, ALGORITHMS)
        try:
            min_bytes = parse_bytes(args.min_bytes, "--min-bytes")
        except ValueError as e:
            raise InputError(str(e)) from None
        if args.fit:
            rows, notes = _load_rows(args.fit, "--fit", ops, algorithms, min_bytes)
            if not rows:
                raise InputError(f"--fit {' '.join(args.fit)}: no usable rows "
                                 "(after --ops / --algorithms / --min-bytes)")
            model = CostModel.fit(rows)
            notes += model.notes
            if not model.fits:
                raise InputError(f"--fit {' '.join(args.fit)}: no row of an algorithm/op the model covers")
        else:
            try:
                model = CostModel.load(args.params)
            except ValueError as e:
                raise InputError(f"--params {e}") from None
            notes = []
        check_rows = []
        if args.check:
            check_rows, more = _load_rows(args.check, "--check", ops, algorithms, min_bytes)
            notes += more
        if args.save:
            try:
                model.save(args.save)
            except OSError as e:
                raise InputError(f"--save {args.save}: cannot write it ({e})") from None
    except InputError as e:
        print(f"costmodel: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"# {n}")
    print(model.summary())
    if args.save:
        print(f"# saved the parameters to {args.save}")
    if not args.check:
        return 0
    lines, any_done = _check(model, check_rows)
    print("\n".join(lines))
    return 0 if any_done else 1
