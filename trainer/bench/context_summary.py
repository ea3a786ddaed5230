"""The context-parallel benchmark's expected traffic, its summary (what cp buys and what it costs)
and the rest of its report: the case table, the figure, the machine's load.

Expected cp bytes per layer per step, one rank (`expected_bytes_per_layer`), written out here from
the algorithms rather than asked of the code under test, so the two can disagree:

    linear, performer  2 (K-1) S with S = B H (F D + F) 4: one all-gather of each rank's (S, z) state
                       forward, one reduce-scatter of its gradient backward, each (K-1) S bytes per
                       rank with a bandwidth-optimal collective; F = D (linear) or nb_features
                       (performer), which also all-gathers each rank's key max forward: (K-1) B H 4
    transnormer        2 (K-1) B H D D 4 in each NormAttention layer (no normaliser travels), 0 in the
                       DiagAttention layers (blocks never straddle ranks), averaged over the layers
    gau                2 (K-1) B s e 4: the sum of lk^T v over each rank's chunks
    softmax            parallel/ring_attention.py cp_attention_bytes: K/V blocks round the ring
                       (ring) or one all-gather of K/V (allgather), plus the backward's traffic

Summary (`summarize`), each goal judged with its numbers:

    (a) memory budget  the longest length under --mem-budget-mb per rank at every cp, on the grid
                       run and interpolated on the log-log memory curve (the grid doubles, so its
                       ratios can only be powers of 2); goal for the linear-time kinds, K the
                       largest cp: T_budget(cp=K) / T_budget(cp=1) >= K (1 - 15%); and memory at
                       K T on K ranks over memory at T on one
    (b) bytes          cp bytes per layer constant in T (max/min - 1 <= 1%) and equal to the formula
    (c) softmax        ring against allgather at the same (cp, T): memory and time; ring memory
                       proportional to T/cp: at every cp, memory grows as T^p with |p - 1| <= 0.15
                       over the lengths run (log-log slope, first to last), and how far memory at
                       (K, T) lies from 1/K of memory at (1, T)
    (d) scaling        at the longest length both cp=1 and cp=2 ran: tokens/s(cp=2) / (2 tokens/s(cp=1)) >= 80%
"""

from __future__ import annotations

import math
import os
import statistics

from . import output

LINEAR_KINDS = ("linear", "performer", "gau", "transnormer")
BUDGET_TOL = 0.15  # T_budget(cp=K) / T_budget(cp=1) >= K (1 - 15%)
BYTES_TOL = 0.01
RING_SLOPE_TOL = 0.15
SCALING_GOAL = 0.80


def expected_bytes_per_layer(kind: str, method: str | None, *, cp: int, seq_len: int, batch: int, d_model: int,
                             n_heads: int, n_layers: int, attn) -> float:
    """What one rank should send per layer per step (module docstring); `attn` is the AttentionConfig."""
    K, B, H, D = cp, batch, n_heads, d_model // n_heads
    if K == 1:
        return 0.0
    if kind == "softmax":
        import torch

        from parallel.ring_attention import cp_attention_bytes
        return float(sum(cp_attention_bytes(method, (B, H, seq_len // K, D), torch.float32, K)))
    if kind in ("linear", "performer"):
        F = D if kind == "linear" else attn.nb_features
        extra = (K - 1) * B * H * 4 if kind == "performer" else 0
        return float(2 * (K - 1) * B * H * (F * D + F) * 4 + extra)
    if kind == "transnormer":
        norm_layers = n_layers - attn.diag_layer_count(n_layers)
        return 2 * (K - 1) * B * H * D * D * 4 * norm_layers / n_layers
    if kind == "gau":
        return float(2 * (K - 1) * B * attn.shared_dim * attn.expansion * d_model * 4)
    raise ValueError(f"no formula for attention kind {kind!r}")


def _ok(r: dict) -> bool:
    return r["status"] == "ok"


def _series(records, variant: str, cp: int, key: str) -> dict[int, float]:
    return {r["seq_len"]: r[key] for r in records if r["variant"] == variant and r["cp"] == cp and _ok(r)}


def budget_length(mem: dict[int, float], budget: float) -> tuple[int | None, float | None, str]:
    """(longest length run under the budget, the length where the log-log memory curve crosses it,
    how: 'interpolated' between two lengths run, 'extrapolated' from the two last (every length under
    the budget) or the two first (none under it), or 'none' (fewer than two lengths ran))."""
    lengths = sorted(mem)
    under = [n for n in lengths if mem[n] <= budget]
    longest = max(under) if under else None
    over = [n for n in lengths if mem[n] > budget and (longest is None or n > longest)]
    if len(lengths) < 2:
        return longest, None, "none"
    if longest is not None and over:
        lo, hi, how = longest, min(over), "interpolated"
    elif longest == lengths[-1]:
        lo, hi, how = lengths[-2], lengths[-1], "extrapolated"
    else:
        lo, hi, how = lengths[0], lengths[1], "extrapolated"
    ylo, yhi = math.log(max(mem[lo], 1e-9)), math.log(max(mem[hi], 1e-9))
    if yhi <= ylo:
        return longest, None, "none"
    slope = (yhi - ylo) / (math.log(hi) - math.log(lo))
    return longest, math.exp(math.log(lo) + (math.log(budget) - ylo) / slope), how


def summarize(records: list[dict], variants: list[str], cps: list[int], budget: float) -> dict:
    kind_of = {r["variant"]: r["kind"] for r in records}
    out: dict = {"budget_mb": budget, "memory": {}, "bytes": {}, "softmax": {}, "scaling": {}}
    for v in variants:  # (a)
        per_cp = {}
        for cp in cps:
            mem = _series(records, v, cp, "mem_mb") or (_series(records, "softmax[ring]", 1, "mem_mb")
                                                        if v.startswith("softmax") and cp == 1 else {})
            longest, t_budget, how = budget_length(mem, budget)
            per_cp[cp] = {"longest": longest, "t_budget": t_budget, "how": how}
        entry = {"per_cp": per_cp}
        lo, hi = per_cp.get(1), per_cp.get(max(cps))
        if lo and hi and max(cps) > 1:
            entry["grid_ratio"] = hi["longest"] / lo["longest"] if lo["longest"] and hi["longest"] else None
            entry["ratio"] = hi["t_budget"] / lo["t_budget"] if lo["t_budget"] and hi["t_budget"] else None
            entry["goal"] = kind_of.get(v) in LINEAR_KINDS
            entry["met"] = None if entry["ratio"] is None else entry["ratio"] >= max(cps) * (1 - BUDGET_TOL)
            one = _series(records, v if v != "softmax[allgather]" else "softmax[ring]", 1, "mem_mb")
            four = _series(records, v, max(cps), "mem_mb")
            entry["mem_kt_over_t"] = {n: four[max(cps) * n] / one[n] for n in sorted(one)
                                      if max(cps) * n in four and one[n] > 0}
        out["memory"][v] = entry
    for v in variants:  # (b)
        if v.startswith("softmax"):  # ring traffic grows with T: (c) and the table compare it with the formula
            continue
        for cp in cps:
            got = _series(records, v, cp, "cp_bytes_per_layer")
            want = _series(records, v, cp, "cp_bytes_expected")
            if not got:
                continue
            spread = (max(got.values()) / min(got.values()) - 1) if min(got.values()) > 0 else \
                (0.0 if max(got.values()) == 0 else math.inf)
            off = max((abs(got[n] / want[n] - 1) if want[n] else abs(got[n])) for n in got)
            out["bytes"][f"{v} cp={cp}"] = {"min": min(got.values()), "max": max(got.values()), "spread": spread,
                                           "expected": sorted(set(want.values())), "off_formula": off,
                                           "met": spread <= BYTES_TOL and off <= BYTES_TOL}
    out["softmax"] = _softmax(records, cps)  # (c)
    for v in variants:  # (d)
        one, two = _series(records, v, 1, "tokens_per_s") or _series(records, "softmax[ring]", 1, "tokens_per_s"), \
            _series(records, v, 2, "tokens_per_s")
        both = sorted(set(one) & set(two))
        if both:
            n = both[-1]
            eff = two[n] / (2 * one[n])
            out["scaling"][v] = {"seq_len": n, "tps_cp1": one[n], "tps_cp2": two[n], "efficiency": eff,
                                 "met": eff >= SCALING_GOAL}
    return out


def _softmax(records: list[dict], cps: list[int]) -> dict:
    ring = {(r["cp"], r["seq_len"]): r for r in records if r["variant"] == "softmax[ring]" and _ok(r)}
    gather = {(r["cp"], r["seq_len"]): r for r in records if r["variant"] == "softmax[allgather]" and _ok(r)}
    pairs = [{"cp": cp, "seq_len": n, "mem_ratio": ring[(cp, n)]["mem_mb"] / gather[(cp, n)]["mem_mb"],
              "speed_ratio": ring[(cp, n)]["tokens_per_s"] / gather[(cp, n)]["tokens_per_s"]}
             for cp, n in sorted(set(ring) & set(gather)) if gather[(cp, n)]["mem_mb"] > 0]
    slopes = {}
    for cp in cps:
        mem = {n: r["mem_mb"] for (c, n), r in ring.items() if c == cp and r["mem_mb"] > 0}
        if len(mem) >= 2:
            lo, hi = min(mem), max(mem)
            p = math.log(mem[hi] / mem[lo]) / math.log(hi / lo)
            slopes[cp] = {"from": lo, "to": hi, "exponent": p, "met": abs(p - 1) <= RING_SLOPE_TOL}
    share = [{"cp": cp, "seq_len": n, "k_mem_over_cp1": cp * ring[(cp, n)]["mem_mb"] / ring[(1, n)]["mem_mb"]}
             for cp, n in sorted(ring) if cp > 1 and (1, n) in ring and ring[(1, n)]["mem_mb"] > 0]
    return {"ring_vs_allgather": pairs, "ring_exponent": slopes, "ring_k_mem_over_cp1": share,
            "proportional_met": all(s["met"] for s in slopes.values()) if slopes else None}


def _verdict(met) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


def _n(x) -> str:
    return "-" if x is None else f"{x / 1024:.0f}K" if x >= 1024 and x % 1024 == 0 else f"{x:,.0f}"


def summary_text(s: dict, variants: list[str], cps: list[int]) -> str:
    top = max(cps)
    lines = [f"(a) longest length under {s['budget_mb']:g} MiB per rank (grid / log-log interpolated; "
             f"goal for the linear-time kinds: T(cp={top}) / T(cp=1) >= {top} x (1 - {BUDGET_TOL:.0%}) = "
             f"{top * (1 - BUDGET_TOL):.2f}x)"]
    for v in variants:
        e = s["memory"][v]
        cells = ", ".join(f"cp={cp}: {_n(p['longest'])} / {_n(p['t_budget'])}"
                          + (" (extrap.)" if p["how"] == "extrapolated" else "") for cp, p in e["per_cp"].items())
        line = f"  {v:<19} {cells}"
        if "ratio" in e:
            ratio = "-" if e["ratio"] is None else f"{e['ratio']:.2f}x"
            grid = "-" if e["grid_ratio"] is None else f"{e['grid_ratio']:.0f}x"
            line += f" | ratio {ratio} (grid {grid})" + (f" -> {_verdict(e['met'])}" if e["goal"] else "")
            if e["mem_kt_over_t"]:
                line += f" | mem({top}T, cp={top}) / mem(T, cp=1): " + ", ".join(
                    f"{_n(n)}: {r:.2f}" for n, r in e["mem_kt_over_t"].items())
        lines.append(line)
    lines.append(f"(b) cp bytes per layer per step constant in T (max/min - 1 <= {BYTES_TOL:.0%}) and equal to "
                 "the formula")
    for name, b in s["bytes"].items():
        if b["max"] == 0 and not any(b["expected"]):
            lines.append(f"  {name:<24} 0 B (no cp traffic) -> met")
            continue
        lines.append(f"  {name:<24} {b['min']:,.0f} .. {b['max']:,.0f} B (spread {b['spread']:.2%}), formula "
                     f"{', '.join(f'{x:,.0f}' for x in b['expected'])} B (off {b['off_formula']:.2%}) -> "
                     f"{_verdict(b['met'])}")
    sm = s["softmax"]
    lines.append("(c) softmax ring vs allgather at the same (cp, T): memory ratio ring / allgather, speed ratio "
                 "ring / allgather")
    lines += [f"  cp={p['cp']} T={_n(p['seq_len'])}: memory {p['mem_ratio']:.2f}x, speed {p['speed_ratio']:.2f}x"
              for p in sm["ring_vs_allgather"]] or ["  no length ran with both methods"]
    lines.append(f"  ring memory proportional to T/cp: memory ~ T^p at each cp, |p - 1| <= {RING_SLOPE_TOL:g}: " + (
        ", ".join(f"cp={cp} {_n(e['from'])}..{_n(e['to'])}: p = {e['exponent']:.2f}"
                  for cp, e in sm["ring_exponent"].items()) or "fewer than two lengths") +
        f" -> {_verdict(sm['proportional_met'])}")
    if sm["ring_k_mem_over_cp1"]:
        lines.append("  ring K x mem(cp=K, T) / mem(cp=1, T) (1 = exactly 1/K of one rank's memory): " + ", ".join(
            f"K={p['cp']} T={_n(p['seq_len'])}: {p['k_mem_over_cp1']:.2f}" for p in sm["ring_k_mem_over_cp1"]))
    lines.append(f"(d) scaling efficiency tokens/s(cp=2) / (2 x tokens/s(cp=1)) at the longest length both ran "
                 f"(goal >= {SCALING_GOAL:.0%})")
    for v in variants:
        d = s["scaling"].get(v)
        lines.append(f"  {v:<19} " + ("no length ran at both cp=1 and cp=2" if d is None else
                     f"T={_n(d['seq_len'])}: {d['tps_cp2']:,.0f} / (2 x {d['tps_cp1']:,.0f}) = "
                     f"{d['efficiency']:.0%} -> {_verdict(d['met'])}"))
    return "\n".join(lines)


# -- the report's other parts: the case table, the figure, the machine's load ----------------------

def case_table(a, records: list[dict]) -> str:
    """Every case, one line each, in the order they ran."""
    rows = [[r["variant"], str(r["cp"]), str(r["seq_len"])] + (
        [f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.0f}", f"{r['mem_mb']:.1f}", f"{r['cp_bytes_per_layer']:,.0f}",
         f"{r['cp_bytes_expected']:,.0f}", f"{r['cp_wait_ms_per_step']:.1f}"] if r["status"] == "ok" else
        [r["status"]] + ["-"] * 5) for r in records]
    title = (f"# context parallelism: DecoderLM d_model {a.d_model} x {a.n_layers} layers, {a.n_heads} heads, batch "
             f"{a.batch}, native engine ({a.algorithm}), one thread per rank, median of {a.trials} trial(s) x "
             f"{a.iters} steps after {a.warmup} warm-up; memory = largest per-rank peak resident-set growth")
    return output.text_table(["variant", "cp", "T", "tokens/s", "ms/step", "mem MiB", "cp B/layer", "formula B",
                              "cp wait ms"], rows, title)


def figure(a, lengths: list[int], variants: list[str], records: list[dict]):
    """Memory, tokens/s and cp bytes per layer against T, log-log: a colour per kind, a line style per cp."""
    fig, axes = output.subplots(3, width=6.5, height=5)
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    styles = {1: "-", 2: "--", 4: ":", 8: "-."}
    for ax, key, label in zip(axes, ("mem_mb", "tokens_per_s", "cp_bytes_per_layer"),
                              ("peak memory growth per rank (MiB)", "tokens/s", "cp bytes per layer per step")):
        for v in variants:
            for cp in a.cp:
                pts = [(r["seq_len"], r[key]) for r in records
                       if r["variant"] == v and r["cp"] == cp and r["status"] == "ok" and r[key] > 0]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=colors[v], ls=styles.get(cp, "-"),
                            label=f"{v} cp={cp}")
        if key == "mem_mb":
            ax.axhline(a.mem_budget_mb, color="grey", lw=0.8, label=f"budget {a.mem_budget_mb:g} MiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_xlabel("sequence length T")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    return fig


def load_line(records: list[dict]) -> str:
    """The machine's load when the cases started: on a shared machine it moves every ratio of time."""
    loads = sorted(r["load_avg_1m"] for r in records if "load_avg_1m" in r)
    resumed = sum(bool(r.get("resumed")) for r in records)
    line = (f"load average (1 min) when a case started: median {statistics.median(loads):.1f}, range "
            f"[{loads[0]:.1f}, {loads[-1]:.1f}] on {os.cpu_count()} cores" if loads else "load average: not recorded")
    return line + (f"; {resumed} of {len(records)} cases reused from cases.jsonl (--resume)" if resumed else "")
