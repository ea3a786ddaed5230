"""Hang diagnosis with real processes: 3 gloo ranks run all-reduces through
Communicator(timeout_s=3), then rank 2 stops taking part (sleeps, or SIGKILLs
itself). Ranks 0 and 1 must exit non-zero soon after, each printing exactly one
line that names the collective, its sequence number (the same on both) and
rank 2 as the missing rank - not hang. The workers (tests/hang_worker.py) join
like torchrun workers through a store this test hosts, as torchrun's agent
does; the four scenarios run at the same time to keep the test short (~25 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 3
EXIT_WITHIN_S = 20.0  # worker timeout 3 s + grace for peer reports + exit, with room for a busy machine
SEQ = 4  # hang_worker.WARMUP + 1
SCENARIOS = {  # name: (how rank 2 stops, algorithm, sync | async)
    "ring-sleep-sync": ("sleep", "ring", "sync"),
    "ring-kill-async": ("kill", "ring", "async"),
    "native-sleep-sync": ("sleep", "native", "sync"),  # torch's own all-reduce: peers unknown to the waiter
    "rhd-sleep-async": ("sleep", "rhd", "async"),  # rank 0 waits on rank 1, which waits on rank 2
}
LINE = re.compile(r"ringtrain: all_reduce #(\d+) \((\w+), group of 3\) (timed out|failed) after \d+\.\d s "
                  r"on rank (\d): (.*)")


def _launch(store_port: int, args: tuple, workdir: str) -> list[subprocess.Popen]:
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), OMP_NUM_THREADS="1",
                   TORCHELASTIC_USE_AGENT_STORE="True")
        err = open(os.path.join(workdir, f"stderr.{rank}"), "w")
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "hang_worker.py"), *args,
                                       os.path.join(workdir, "stopped")],
                                      env=env, stdout=subprocess.DEVNULL, stderr=err))
        err.close()
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs every scenario at once; per scenario: when rank 2 stopped, and per
    survivor (exit code, exit time, stderr)."""
    launched = {}
    for name, args in SCENARIOS.items():
        workdir = str(tmp_path_factory.mktemp(name))
        # one store per scenario, hosted here like torchrun's agent: it outlives the workers
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        launched[name] = (store, workdir, _launch(store.port, args, workdir))
    exited: dict[tuple[str, int], tuple[int, float]] = {}
    give_up = time.time() + 90
    try:
        while time.time() < give_up and len(exited) < 2 * len(SCENARIOS):
            for name, (_, _, procs) in launched.items():
                for rank in (0, 1):
                    rc = procs[rank].poll()
                    if rc is not None and (name, rank) not in exited:
                        exited[name, rank] = (rc, time.time())
            time.sleep(0.05)
    finally:
        for _, _, procs in launched.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    results = {}
    for name, (_, workdir, _) in launched.items():
        stop_file = os.path.join(workdir, "stopped")
        stopped = float(open(stop_file).read()) if os.path.exists(stop_file) else None
        survivors = {}
        for rank in (0, 1):
            with open(os.path.join(workdir, f"stderr.{rank}")) as f:
                survivors[rank] = (*exited.get((name, rank), (None, None)), f.read())
        results[name] = (stopped, survivors)
    return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_survivors_fail_with_one_line(runs, name):
    stopped, survivors = runs[name]
    _, algorithm, _ = SCENARIOS[name]
    assert stopped is not None, f"rank 2 never reached the point where it stops: {survivors}"
    seqs = set()
    for rank, (rc, exit_time, stderr) in survivors.items():
        assert rc is not None, f"rank {rank} never exited (hang):\n{stderr}"
        assert rc == 1, f"rank {rank} exit code {rc}:\n{stderr}"
        assert exit_time - stopped < EXIT_WITHIN_S, f"rank {rank} took {exit_time - stopped:.1f} s:\n{stderr}"
        assert "Traceback" not in stderr, stderr
        lines = [ln for ln in stderr.splitlines() if ln.startswith("ringtrain:")]
        assert len(lines) == 1, stderr
        m = LINE.fullmatch(lines[0])
        assert m, lines[0]
        seq, algo, _, on_rank, why = m.groups()
        assert (algo, int(on_rank)) == (algorithm, rank), lines[0]
        # directly or through the chain of waiting ranks, every survivor names rank 2 as missing
        assert why.endswith("rank(s) [2]"), lines[0]
        if algorithm == "rhd" and rank == 0:  # the fold: rank 0 only talks to rank 1
            assert re.fullmatch(r"(no response from|lost connection to) rank\(s\) \[1\]; missing rank\(s\) \[2\]",
                                why), lines[0]
        seqs.add(int(seq))
    assert seqs == {SEQ}, [s[2] for s in survivors.values()]
