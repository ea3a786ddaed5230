"""The ranks of tests/test_hang.py: a few collectives through Communicator(timeout_s=3),
then rank 2 stops taking part and the others must fail with one line and exit.

    python tests/helpers/hang_worker.py PLAN.json

PLAN: {"hang_s": S, "scenarios": [{"name", "args": [MODE, OP, ALGORITHM, SYNC|ASYNC],
"store_port", "workdir"}, ...]}. This process imports torch once and forks the three
ranks of every scenario (so 27 ranks do not each pay for importing torch on a busy
machine); each rank sets the environment a torchrun worker gets (RANK, WORLD_SIZE,
MASTER_ADDR/PORT, and the store hosted by the test as torchrun's agent does) before it
touches torch.distributed, writes its stderr to WORKDIR/stderr.RANK, and exits 1 with
the error line on stderr, as the trainer does.
MODE sleep: rank 2 sleeps (stuck outside communication); kill: it SIGKILLs itself.
OP: all_reduce | reduce_scatter | all_gather | all_to_all | broadcast (from rank 2, so
that every survivor waits on it, directly or through the other survivor).
Rank 2 creates WORKDIR/stopped when it stops. Once both survivors of a scenario have
exited, its rank 2 is killed; a survivor still running HANG_S after the start is killed
and reported as hung. The exit codes go to WORKDIR/exit_codes.json (null: hung).
"""

import json
import os
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.collectives import CollectiveTimeout, Communicator, split_bounds  # noqa: E402
from parallel.process_group import abort_process, init_distributed  # noqa: E402

WORLD = 3
WARMUP = 3  # collectives every rank completes; the one rank 2 misses is #WARMUP + 1
TIMEOUT_S = 3.0  # the communicator's; test_hang.py reads it
N = 3 << 15  # 384 KiB of float32, divisible by 3: the ring cuts each piece into pipelined segments
SRC = 2  # broadcast source: the rank that stops


def issue(comm: Communicator, op: str, rank: int, world: int, async_op: bool):
    """One `op` on fresh buffers; returns its handle (None when synchronous)."""
    b = split_bounds(N, world)
    if op == "all_reduce":
        return comm.all_reduce(torch.ones(N), async_op=async_op)
    if op == "reduce_scatter":
        return comm.reduce_scatter(torch.empty(b[rank + 1] - b[rank]), torch.ones(N), async_op=async_op)
    if op == "all_gather":
        return comm.all_gather(torch.empty(N), torch.ones(b[rank + 1] - b[rank]), async_op=async_op)
    if op == "all_to_all":
        return comm.all_to_all(torch.empty(N), torch.ones(N), async_op=async_op)
    if op == "broadcast":
        return comm.broadcast(torch.ones(N), SRC, async_op=async_op)
    raise ValueError(f"unknown op {op!r}")


def main(mode: str, op: str, algorithm: str, sync: str, stop_file: str) -> None:
    torch.set_num_threads(1)
    # the process group's own timeout is far beyond the test's hang guard: only the
    # communicator's deadline can end a wait on the missing rank
    ctx = init_distributed("gloo", timeout_s=3600)
    comm = Communicator(None, algorithm=algorithm, timeout_s=TIMEOUT_S)
    try:
        dist.barrier()  # every rank is in: a slow start (busy machine) must not fire the 3 s deadline
        for _ in range(WARMUP):
            issue(comm, op, ctx.rank, ctx.world_size, False)
        dist.barrier()  # everyone has finished #WARMUP before rank 2 stops (not counted: not comm's)
        if ctx.rank == 2:
            with open(stop_file, "w") as f:
                f.write(repr(time.time()))
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        for _ in range(2):
            if sync == "async":  # queued behind each other on the communicator's thread
                for handle in [issue(comm, op, ctx.rank, ctx.world_size, True) for _ in range(3)]:
                    handle.wait()
            else:
                issue(comm, op, ctx.rank, ctx.world_size, False)
    except CollectiveTimeout as exc:
        abort_process(str(exc))
    print("finished without noticing the missing rank", file=sys.stderr)


def _rank(rank: int, scenario: dict) -> None:
    """A forked child: becomes one rank of `scenario`, never returns."""
    code = 1
    try:
        workdir = scenario["workdir"]
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(scenario["store_port"]), OMP_NUM_THREADS="1",
                          TORCHELASTIC_USE_AGENT_STORE="True")
        err = os.open(os.path.join(workdir, f"stderr.{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(err, 2)
        os.dup2(null, 1)
        main(*scenario["args"], os.path.join(workdir, "stopped"))
        code = 0
    except BaseException:  # noqa: BLE001  (the test reads it from the stderr file)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_plan(plan: dict) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, tuple[str, int]] = {}  # pid: (scenario, rank)
    pids: dict[tuple[str, int], int] = {}
    for scenario in plan["scenarios"]:
        for rank in range(WORLD):
            pid = os.fork()
            if pid == 0:
                _rank(rank, scenario)
            ranks[pid] = (scenario["name"], rank)
            pids[scenario["name"], rank] = pid
    started = time.monotonic()
    codes: dict[tuple[str, int], int | None] = {}
    killed: set[int] = set()

    def kill(pid):
        if pid not in killed:
            killed.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            name, rank = ranks.pop(pid)
            codes[name, rank] = None if pid in killed else os.waitstatus_to_exitcode(status)
            continue
        for scenario in plan["scenarios"]:  # survivors done: rank 2 (asleep for minutes) goes too
            name = scenario["name"]
            if (name, 0) in codes and (name, 1) in codes and (name, 2) not in codes:
                kill(pids[name, 2])
        if time.monotonic() - started > plan["hang_s"]:
            for pid in list(ranks):
                kill(pid)
        time.sleep(0.05)
    for scenario in plan["scenarios"]:
        with open(os.path.join(scenario["workdir"], "exit_codes.json"), "w") as f:
            json.dump({str(r): codes[scenario["name"], r] for r in (0, 1)}, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run_plan(json.load(f))
