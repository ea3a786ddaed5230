"""Context-parallel benchmark: how long a sequence each attention kind trains under a memory budget
at cp = 1, 2, 4, what the cp traffic is, and what the throughput costs.

    python -m trainer.bench.context --out runs/bench/context
    python -m trainer.bench.context --attention linear,softmax --cp 1,2 --min-len 1024 --seq-len 2048

For every kind in --attention (softmax once per --softmax-methods: ring, allgather; allgather only
at cp > 1, where it differs), every cp in --cp and every length --min-len, 2 --min-len, ... <=
--seq-len, one case: a fresh torchrun launch of cp ranks (one thread each, so a rank's peak
resident set is its own; at cp 1 the worker alone, a world of one, without the launcher's
start-up) that builds a DecoderLM (the shape flags, the attention settings of
configs/attention/<kind>.yaml, model.seq_len = T) and trains it through the native engine's real
step (`build_engine("native")`, parallel.cp_size = cp) on one fixed batch of --batch sequences of
T tokens, which every rank of the cp group shares and splits. One untimed priming step of cp x
--prime-len tokens pages in kernels and allocates the optimizer states; then the memory baseline
(parallel/bench/timing.py PeakMemory) and --trials trials of --warmup + --iters steps.

Per case: tokens/s (T x batch over the median of the trials' step time, each the mean over ranks),
`mem_mb` (the largest over ranks of the peak resident-set growth over the baseline: what the
length adds, activations mostly), cp bytes per layer per step (comms.cp.stats.bytes_sent / steps /
n_layers, mean over ranks; 0 at cp 1) next to the formula of trainer/bench/context_summary.py,
and cp wait seconds per step (mean over ranks, warm-up steps included). Cases run length by
length (every kind and cp at T before 2T), so the peers a ratio compares ran close in time. A case
past --case-timeout seconds (start-up included) is `timeout`, one killed without a result `oom`,
and the kind's longer lengths at that cp are `skipped`; any other failure is `error`.

Every finished case is appended to <out>/cases.jsonl as it finishes; `--resume` reuses those of a
run with the same flags that was stopped half-way and runs the others (only --mem-budget-mb may
differ: it changes the summary, not a case, so `--resume` on a finished run re-summarizes it).

Outputs (trainer/bench/output.py): table.txt (every case, then the summary of context_summary.py:
longest length under --mem-budget-mb, bytes against the formula, ring vs allgather, scaling
efficiency, each goal met or missed), context.csv, context.json and context.png (memory, tokens/s
and cp bytes per layer against T, log-log, one line per kind x cp).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.config import AttentionConfig, ModelConfig
from models.transformer import DecoderLM
from parallel.bench.timing import PeakMemory
from parallel.context_parallel import check_context_parallel
from parallel.mesh import MeshShape, Topology
from parallel.process_group import abort_process

from ..engines import build_engine
from . import common, flags, output
from .attention import sequence_lengths
from .context_summary import case_table, expected_bytes_per_layer, figure, load_line, summarize, summary_text

SHAPE = ("attention", "d_model", "n_layers", "n_heads", "mlp_ratio", "seq_len", "batch")
FORWARDED = ("d_model", "n_layers", "n_heads", "mlp_ratio", "batch", "warmup", "iters", "trials", "seed", "algorithm",
             "lr", "prime_len")  # and per case --attention, --cp, --seq-len
COLUMNS = ["variant", "kind", "method", "cp", "seq_len", "batch", "status", "tokens_per_s", "step_ms", "mem_mb",
           "cp_bytes_per_layer", "cp_bytes_expected", "cp_wait_ms_per_step", "dp_bytes_per_step", "last_loss",
           "message"]
FAILED = ("oom", "timeout")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "attention"


def attention_config(kind: str) -> AttentionConfig:
    """The settings of configs/attention/<kind>.yaml, as `attention=<kind>` gives the trainer."""
    from omegaconf import OmegaConf

    return AttentionConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{kind}.yaml")))


def parse_args(argv=None) -> argparse.Namespace:
    ap = flags.parser("context", __doc__, shape=SHAPE, many_kinds=True, defaults={
        "attention": "softmax,linear,performer,gau,transnormer", "d_model": 64, "n_layers": 2, "n_heads": 2,
        "seq_len": 65536, "batch": 1, "warmup": 1, "iters": 2, "trials": 1})
    ap.add_argument("--min-len", type=flags.number(), default=4096, help="shortest length; lengths double up to "
                    "--seq-len")
    ap.add_argument("--cp", type=flags.names(["1", "2", "4", "8"]), default="1,2,4", help="cp sizes (ranks per case)")
    ap.add_argument("--softmax-methods", type=flags.names(["ring", "allgather"]), default="ring,allgather",
                    help="parallel.cp_softmax values softmax runs with")
    ap.add_argument("--mem-budget-mb", type=flags.number(float, 0, above=True), default=256.0,
                    help="per-rank memory growth budget of the summary's longest-length figures (the default: "
                    "every kind crosses it at cp 1 between 4K and 16K tokens with the default shape)")
    ap.add_argument("--case-timeout", type=flags.number(float, 0, above=True), default=60.0,
                    help="seconds per case, start-up included")
    ap.add_argument("--prime-len", type=flags.number(int, 0), default=256,
                    help="tokens per rank of the untimed priming step; 0 = none")
    ap.add_argument("--algorithm", choices=("ring", "rhd", "tree", "native"), default="ring",
                    help="ringtrain's collective algorithm (dp and cp communicators)")
    ap.add_argument("--lr", type=flags.number(float, 0, above=True), default=1e-3, help="AdamW learning rate")
    ap.add_argument("--resume", action="store_true", help="go on from --out's cases.jsonl, which a run with the "
                    "same flags stopped half-way left")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "METHOD", "RESULT"), help=argparse.SUPPRESS)
    a = flags.parse(ap, argv)
    a.cp = sorted(int(c) for c in a.cp)
    if a.one is None and a.seq_len < a.min_len:
        ap.error(f"--seq-len ({a.seq_len}) must be >= --min-len ({a.min_len})")
    for kind in a.attention:
        attn = attention_config(kind)
        for cp in a.cp:
            for n in (sequence_lengths(a.min_len, a.seq_len) if a.one is None else [a.seq_len]):
                try:
                    check_context_parallel(cp_size=cp, seq_len=n, kind=kind, chunk_size=attn.chunk_size,
                                           block_size=attn.block_size, diag_layers=attn.diag_layer_count(a.n_layers))
                except ValueError as e:
                    ap.error(str(e).replace("model.seq_len", "a length of --min-len .. --seq-len")
                             .replace("parallel.cp_size", "--cp"))
    return a


# -- the worker: one case, cp ranks under torchrun -------------------------------------------------

def worker(a) -> int:
    kind, method, result = a.one
    torch.set_num_threads(1)
    with common.distributed() as ctx:
        K, dev = ctx.world_size, ctx.device
        mesh = Topology.build(MeshShape(K, cp=K), dev.type)
        comms = mesh.communicators(algorithm=a.algorithm)
        attn = attention_config(kind)
        model_cfg = ModelConfig(seq_len=a.seq_len, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                                mlp_ratio=a.mlp_ratio)
        torch.manual_seed(a.seed)
        model = DecoderLM(model_cfg, attn).to(dev)
        slices = common.engine_slices(a, algorithm=a.algorithm)
        slices["parallel"] = dataclasses.replace(slices["parallel"], cp_size=K, cp_softmax=method)
        engine = build_engine("native", model=model, comms=comms, device=dev, **slices)

        def batch(n):  # every rank of the cp group holds the same sequences (data_rank 0)
            return common.FixedBatch(argparse.Namespace(seed=a.seed, batch=a.batch, seq_len=n), mesh.data_rank, dev)
        if 0 < K * a.prime_len < a.seq_len:
            common.Contender(engine, batch(K * a.prime_len))()
        for c in comms.all():
            c.stats.reset()
        memory = PeakMemory(dev)
        contender = common.Contender(engine, batch(a.seq_len))
        trial_s = common.time_steps({kind: contender}, a, dev)[kind]
        growth = memory.growth_mb()
        cp, dp = comms.cp.stats if comms.cp is not None else None, comms.dp.stats
        mine = torch.tensor([growth, memory.slack_mb, memory.baseline_mb, cp.bytes_sent if cp else 0,
                             cp.wait_s if cp else 0.0, dp.bytes_sent, dp.wait_s], dtype=torch.float64, device=dev)
        every = [torch.empty_like(mine) for _ in range(K)]
        dist.all_gather(every, mine)
        _, last = common.losses({kind: contender}, mesh.group("dp"), dev)[kind]
        if ctx.is_main:
            ranks = torch.stack(every).tolist()
            steps, mean = contender.steps, [sum(col) / K for col in zip(*ranks)]
            Path(result).write_text(json.dumps({
                **output.timed(trial_s, a.batch * a.seq_len), "mem_mb": max(r[0] for r in ranks),
                "mem_mb_ranks": [r[0] for r in ranks], "mem_slack_mb": max(r[1] for r in ranks),
                "mem_baseline_mb": max(r[2] for r in ranks), "cp_bytes_per_layer": mean[3] / steps / a.n_layers,
                "cp_bytes_ranks": [r[3] / steps / a.n_layers for r in ranks],
                "cp_wait_ms_per_step": mean[4] / steps * 1e3, "dp_bytes_per_step": mean[5] / steps,
                "dp_wait_ms_per_step": mean[6] / steps * 1e3, "steps": steps, "last_loss": last,
                "params": sum(p.numel() for p in model.parameters()), "engine": engine.describe()}))
        contender.close()
    return 0


# -- the parent: every case ------------------------------------------------------------------------

def run_case(a, kind: str, method: str, cp: int, seq_len: int, result: Path) -> dict:
    """One launch of the worker (cp ranks); never raises for a timeout, an OOM kill or a failing case."""
    cwd, env = flags.child_env()
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"] if cp > 1 else []
    cmd = [sys.executable, *launcher, "-m", "trainer.bench.context", "--one", kind, method, str(result),
           "--attention", kind, "--cp", str(cp), "--seq-len", str(seq_len), *flags.argv_of(a, FORWARDED)]
    t0 = time.perf_counter()
    # a session of its own, so a timeout ends torchrun and every rank it started
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=a.case_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "message": f"over --case-timeout {a.case_timeout:g} s (killed)"}
    if proc.returncode == 0 and result.exists():
        return {"status": "ok", **json.loads(result.read_text()), "case_wall_s": time.perf_counter() - t0}
    if "SIGKILL" in stderr or "Signal 9" in stderr:
        return {"status": "oom", "message": "a rank was killed by SIGKILL (most likely the OOM killer)"}
    return {"status": "error", "message": f"exit code {proc.returncode}: {_cause(stderr)}"[:500]}


def _cause(stderr: str) -> str:
    """The ranks' own error line out of torchrun's report (its ChildFailedError says nothing)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if re.match(r"([\w.]+(Error|Exception|Timeout)\b|.*: error: )", ln)
           and "ChildFailedError" not in ln]
    return (own or lines or ["no output"])[-1]


def plan(a) -> list[tuple[str, str, str, int]]:
    """(variant, kind, method, cp) of every series; allgather only at cp > 1."""
    out = []
    for kind in a.attention:
        for method in (a.softmax_methods if kind == "softmax" else ["ring"]):
            variant = f"softmax[{method}]" if kind == "softmax" else kind
            out += [(variant, kind, method, cp) for cp in a.cp if not (method == "allgather" and cp == 1)]
    return out


def _journal(a) -> tuple[Path, dict]:
    """<out>/cases.jsonl, every finished case as it finishes, so a run stopped half-way (a long run on
    a shared machine) can go on with --resume; returns it and the cases it already holds."""
    def cases_of(values: dict) -> dict:  # the flags that decide what a case measures
        return {k: v for k, v in values.items() if k not in ("out", "resume", "mem_budget_mb")}
    path, same = Path(a.out) / "cases.jsonl", cases_of(vars(a))
    done: dict = {}
    if a.resume and not path.exists():
        raise SystemExit(f"--resume: there is no {path} to go on from")
    path.parent.mkdir(parents=True, exist_ok=True)
    if a.resume:
        head, *cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if cases_of(head) != same:
            raise SystemExit(f"--resume: {path} was written with other flags: {head}")
        done = {(r["variant"], r["cp"], r["seq_len"]): r for r in cases}
    else:
        path.write_text(json.dumps(same) + "\n")
    return path, done


def run_sweep(a, lengths: list[int]) -> list[dict]:
    series, records = plan(a), []
    failed: dict[tuple, tuple[str, int]] = {}
    journal, done = _journal(a)
    with tempfile.TemporaryDirectory(prefix="bench-context-") as tmp:
        for seq_len in lengths:
            for i, (variant, kind, method, cp) in enumerate(series):
                key = (variant, cp)
                if (variant, cp, seq_len) in done:
                    rec = {**done[(variant, cp, seq_len)], "resumed": True}
                else:
                    load = os.getloadavg()[0]
                    if key in failed:
                        res = {"status": "skipped", "message": f"{failed[key][0]} at seq_len {failed[key][1]}"}
                    else:
                        res = run_case(a, kind, method, cp, seq_len, Path(tmp) / f"{seq_len}-{i}.json")
                    rec = {"variant": variant, "kind": kind, "method": method if kind == "softmax" else None,
                           "cp": cp, "seq_len": seq_len, "batch": a.batch, **res,
                           "cp_bytes_expected": expected_bytes_per_layer(
                               kind, method, cp=cp, seq_len=seq_len, batch=a.batch, d_model=a.d_model,
                               n_heads=a.n_heads, n_layers=a.n_layers, attn=attention_config(kind)),
                           "load_avg_1m": load}
                    with open(journal, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if rec["status"] in FAILED:
                    failed[key] = (rec["status"], seq_len)
                records.append(rec)
                shown = (f"{rec['tokens_per_s']:,.0f} tok/s, {rec['mem_mb']:.0f} MiB, "
                         f"{rec['cp_bytes_per_layer']:,.0f} B/layer ({rec['case_wall_s']:.0f} s)"
                         if rec["status"] == "ok" else f"{rec['status']}: {rec.get('message', '')}")
                print(f"{variant:<19} cp={cp} T={seq_len:>6}: {shown}", flush=True)
    return records


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one is not None:
        return worker(a)
    lengths = sequence_lengths(a.min_len, a.seq_len)
    records = run_sweep(a, lengths)
    variants = list(dict.fromkeys(v for v, *_ in plan(a)))
    summary = summarize(records, variants, a.cp, a.mem_budget_mb)
    _report(a, lengths, variants, records, summary)
    return 0


def _report(a, lengths, variants, records, summary) -> None:
    table = "\n\n".join([case_table(a, records), summary_text(summary, variants, a.cp), load_line(records)])
    meta = output.run_meta(
        lengths=lengths, kind_settings={k: dataclasses.asdict(attention_config(k)) for k in a.attention},
        mem_mb="max over ranks of ru_maxrss growth (peak resident set, not tensor bytes) over a baseline after the "
               "model, the engine and one priming step of cp x --prime-len tokens",
        cp_bytes_per_layer="comms.cp.stats.bytes_sent / steps / n_layers, mean over ranks",
        tokens_per_s="T x batch / median over trials of the mean (over ranks) step time",
        load_avg_1m="os.getloadavg()[0] when the case started")
    output.write(a.out, "context", args=a, meta=meta, results=records, columns=COLUMNS, table=table,
                 figure=figure(a, lengths, variants, records), extra={"summary": summary})


if __name__ == "__main__":
    abort_process(None, exit_code=main() or 0)  # no interpreter teardown: see trainer/train.py
