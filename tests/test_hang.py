"""Hang diagnosis with real processes: 3 gloo ranks run collectives through
Communicator(timeout_s=3), then rank 2 stops taking part (sleeps, or SIGKILLs
itself). Ranks 0 and 1 must exit non-zero, each printing exactly one line that
names the collective, its sequence number (the same on both) and rank 2 as the
missing rank - not hang. Every op appears, and every algorithm (ring, rhd, tree,
native). The ranks (tests/helpers/hang_worker.py, forked from one process that imported torch
once) join like torchrun workers through a store this test hosts, as torchrun's agent
does; all scenarios run at the same time to keep the test short.

Nothing here is timed against the clock except the hang guard: a survivor that has
not exited HANG_S after the start is killed and reported as a hang.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

from hang_worker import TIMEOUT_S, WARMUP

HERE = os.path.dirname(os.path.abspath(__file__))
HANG_S = 120.0  # generous: startup on a loaded machine + timeout 3 s + grace for peer reports + exit
SEQ = WARMUP + 1
SCENARIOS = {  # name: (how rank 2 stops, op, algorithm, sync | async)
    "ring-sleep-sync": ("sleep", "all_reduce", "ring", "sync"),
    "ring-kill-async": ("kill", "all_reduce", "ring", "async"),
    "native-sleep-sync": ("sleep", "all_reduce", "native", "sync"),  # torch's own: peers unknown to the waiter
    "rhd-sleep-async": ("sleep", "all_reduce", "rhd", "async"),  # rank 0 waits on rank 1, which waits on rank 2
    "reduce_scatter-native-sleep-async": ("sleep", "reduce_scatter", "native", "async"),
    "all_gather-ring-kill-sync": ("kill", "all_gather", "ring", "sync"),  # rank 1 waits on rank 0 for piece 2
    "all_to_all-ring-sleep-sync": ("sleep", "all_to_all", "ring", "sync"),
    "broadcast-tree-kill-async": ("kill", "broadcast", "tree", "async"),  # from rank 2: both wait on it
    # gloo's broadcast and reduce-scatter ignore the timeout given to wait (Transport._wait_bounded)
    "broadcast-native-sleep-sync": ("sleep", "broadcast", "native", "sync"),
}
LINE = re.compile(r"ringtrain: (\w+) #(\d+) \((\w+), group of 3\) (timed out|failed) after (\d+\.\d) s "
                  r"on rank (\d): (.*)")
# PeerFailure.from_error calls a failed wait "timed out" once the deadline is this close
# (torch rounds the wait down to whole milliseconds), so a "timed out" line reports at least:
MIN_TIMED_OUT_S = TIMEOUT_S - 0.1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs every scenario at once; per scenario: whether rank 2 reached the point where it
    stops, and per survivor (exit code, None if it hung; stderr)."""
    plan = {"hang_s": HANG_S, "scenarios": []}
    stores = []  # one per scenario, hosted here like torchrun's agent: it outlives the workers
    for name, args in SCENARIOS.items():
        stores.append(dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False))
        plan["scenarios"].append({"name": name, "args": list(args), "store_port": stores[-1].port,
                                  "workdir": str(tmp_path_factory.mktemp(name))})
    plan_file = tmp_path_factory.mktemp("plan") / "plan.json"
    plan_file.write_text(json.dumps(plan))
    # the launcher kills every rank by HANG_S; this limit only guards against the launcher itself
    proc = subprocess.run([sys.executable, os.path.join(HERE, "helpers", "hang_worker.py"), str(plan_file)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=HANG_S + 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for sc in plan["scenarios"]:
        workdir = sc["workdir"]
        codes = json.loads(open(os.path.join(workdir, "exit_codes.json")).read())
        survivors = {r: (codes[str(r)], open(os.path.join(workdir, f"stderr.{r}")).read()) for r in (0, 1)}
        results[sc["name"]] = (os.path.exists(os.path.join(workdir, "stopped")), survivors)
    return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_survivors_fail_with_one_line(runs, name):
    stopped, survivors = runs[name]
    mode, op, algorithm, _ = SCENARIOS[name]
    assert stopped, f"rank 2 never reached the point where it stops: {survivors}"
    seqs, verdicts = set(), []
    for rank, (rc, stderr) in survivors.items():
        assert rc is not None, f"rank {rank} did not exit within {HANG_S} s (hang):\n{stderr}"
        assert rc == 1, f"rank {rank} exit code {rc}:\n{stderr}"
        assert "Traceback" not in stderr, stderr
        lines = [ln for ln in stderr.splitlines() if ln.startswith("ringtrain:")]
        assert len(lines) == 1, stderr
        m = LINE.fullmatch(lines[0])
        assert m, lines[0]
        line_op, seq, algo, verdict, elapsed, on_rank, why = m.groups()
        assert (line_op, algo, int(on_rank)) == (op, algorithm, rank), lines[0]
        # directly or through the chain of waiting ranks, every survivor names rank 2 as missing
        assert why.endswith("rank(s) [2]"), lines[0]
        if algorithm == "rhd" and rank == 0:  # the fold: rank 0 only talks to rank 1
            assert re.fullmatch(r"(no response from|lost connection to) rank\(s\) \[1\]; missing rank\(s\) \[2\]",
                                why), lines[0]
        if verdict == "timed out":  # it waited until its deadline
            assert float(elapsed) >= MIN_TIMED_OUT_S, lines[0]
        seqs.add(int(seq))
        verdicts.append(verdict)
    assert seqs == {SEQ}, [s[1] for s in survivors.values()]
    if mode == "sleep":  # nothing breaks a connection before a survivor's deadline has passed
        assert "timed out" in verdicts, [s[1] for s in survivors.values()]
