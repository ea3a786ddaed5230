"""The attention benchmark's summary: time growth for 8x the length, and where each kind overtakes softmax.

A linear-time kind should grow by at most 10x for 8x the length (softmax approaches 64x). Its
crossover is the first measured length from which it is faster than softmax at every longer
measured length.
"""

from __future__ import annotations

import math

BASELINE_KIND = "softmax"
LINEAR_TIME_MAX_GROWTH = 10.0  # a linear-time kind: 8x the length -> at most 10x the time
GROWTH_FACTOR = 8
NAMED_GROWTH_PAIRS = ((1024, 8192), (256, 2048))


def times_of(records: list[dict], kind: str) -> dict[int, float | None]:
    """seq_len -> median time (ms), None where the case did not run."""
    return {r["seq_len"]: (r["step_ms"] if r["status"] == "ok" else None) for r in records if r["kind"] == kind}


def growth_ratios(times: dict[int, float | None], factor: int = GROWTH_FACTOR) -> dict[str, float]:
    """{"L->fL": time(fL) / time(L)} for every measured pair."""
    out = {}
    for length in sorted(times):
        longer = length * factor
        if times.get(length) and times.get(longer):
            out[f"{length}->{longer}"] = times[longer] / times[length]
    return out


def crossover(times: dict[int, float | None], baseline: dict[int, float | None]) -> int | None:
    """The first length from which `times` beats `baseline` at every longer measured length; None if never.

    A length counts as faster when this kind ran and the baseline either ran slower or
    did not run (oom/timeout); it does not when this kind did not run. Lengths absent
    from either side are ignored.
    """
    lengths = sorted(set(times) & set(baseline))
    first = None
    for length in lengths:
        mine, theirs = times[length], baseline[length]
        faster = mine is not None and (theirs is None or mine < theirs)
        if faster and first is None:
            first = length
        elif not faster:
            first = None
    return first


def summarize(records: list[dict], kinds: list[str], max_len: int) -> dict:
    base = times_of(records, BASELINE_KIND) if BASELINE_KIND in kinds else None
    summary = {}
    for kind in kinds:
        times = times_of(records, kind)
        ratios = growth_ratios(times)
        entry: dict = {"growth_8x": ratios,
                       "exponent_8x": {k: math.log(v) / math.log(GROWTH_FACTOR) for k, v in ratios.items()},
                       "named_pairs": [f"{a}->{b}" for a, b in NAMED_GROWTH_PAIRS if f"{a}->{b}" in ratios]}
        if kind != BASELINE_KIND:
            over = [k for k, v in ratios.items() if v > LINEAR_TIME_MAX_GROWTH]
            entry["meets_linear_growth"] = (not over) if ratios else None
            entry["pairs_over_10x"] = over
            if base is None:
                entry["crossover"] = None
                entry["crossover_text"] = "n/a (softmax not measured)"
            else:
                length = crossover(times, base)
                entry["crossover"] = length
                entry["crossover_text"] = str(length) if length is not None else f"none up to {max_len}"
                last = max(times)
                if times.get(last) and base.get(last):
                    entry[f"speedup_vs_softmax_at_{last}"] = base[last] / times[last]
        summary[kind] = entry
    return summary


def summary_text(summary: dict, kinds: list[str]) -> str:
    lines = [f"summary: time growth for {GROWTH_FACTOR}x the length (linear-time target <= "
             f"{LINEAR_TIME_MAX_GROWTH:g}x, quadratic -> {GROWTH_FACTOR ** 2}x), crossover vs {BASELINE_KIND}"]
    for kind in kinds:
        s = summary[kind]
        parts = [f"{k}: {v:.2f}x (T^{s['exponent_8x'][k]:.2f})" for k, v in s["growth_8x"].items()] or ["n/a"]
        line = f"  {kind:<12} growth " + ", ".join(parts)
        if kind != BASELINE_KIND:
            if s["meets_linear_growth"] is None:
                verdict = "n/a"
            elif s["meets_linear_growth"]:
                verdict = "yes"
            else:
                verdict = "no (" + ", ".join(s["pairs_over_10x"]) + ")"
            line += f" | <= {LINEAR_TIME_MAX_GROWTH:g}x: {verdict} | crossover: {s['crossover_text']}"
            speed = [(k, v) for k, v in s.items() if k.startswith("speedup_vs_softmax_at_")]
            if speed:
                line += f" | vs softmax at {speed[0][0].rsplit('_', 1)[1]}: {speed[0][1]:.2f}x"
        lines.append(line)
    return "\n".join(lines)
