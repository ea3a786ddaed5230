"""One rank of tests/test_hang.py: a few all-reduces through Communicator(timeout_s=3),
then rank 2 stops taking part and the others must fail with one line and exit.

    python tests/hang_worker.py MODE ALGORITHM SYNC|ASYNC STOP_FILE
MODE sleep: rank 2 sleeps (stuck outside communication); kill: it SIGKILLs itself.
Joins the job like a torchrun worker (RANK, WORLD_SIZE, MASTER_ADDR/PORT, and the
store hosted by the launcher as torchrun's agent does); rank 2 writes the time it
stopped to STOP_FILE. Exits 1 with the error line on stderr, as the trainer does.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.collectives import CollectiveTimeout, Communicator  # noqa: E402
from parallel.process_group import abort_process, init_distributed  # noqa: E402

WARMUP = 3  # collectives every rank completes; the one rank 2 misses is #WARMUP + 1


def main(mode: str, algorithm: str, sync: str, stop_file: str) -> None:
    torch.set_num_threads(1)
    # the process group's own timeout is long, so what fires is the communicator's
    ctx = init_distributed("gloo", timeout_s=120)
    comm = Communicator(None, algorithm=algorithm, timeout_s=3.0)
    t = torch.ones(1 << 16)  # 256 KiB: the ring cuts it into pipelined segments
    try:
        for _ in range(WARMUP):
            comm.all_reduce(t)
        dist.barrier()  # everyone has finished #WARMUP before rank 2 stops (not counted: not comm's)
        if ctx.rank == 2:
            with open(stop_file + ".tmp", "w") as f:
                f.write(repr(time.time()))
            os.replace(stop_file + ".tmp", stop_file)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        for _ in range(2):
            if sync == "async":  # queued behind each other on the communicator's thread
                for handle in [comm.all_reduce(t, async_op=True) for _ in range(3)]:
                    handle.wait()
            else:
                comm.all_reduce(t)
    except CollectiveTimeout as exc:
        abort_process(str(exc))
    print("finished without noticing the missing rank", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
