"""launch/ end to end, with real processes:

- two torchrun agents on this machine (2 ranks each, --nnodes=2) meet through c10d
  rendezvous on 127.0.0.1 via launch/multinode.sh, train into one shared run directory,
  and end bitwise equal to one agent with 4 ranks (launch/local.sh);
- elastic recovery: under launch/local.sh with MAX_RESTARTS=2, one worker is SIGKILLed
  after a checkpoint at a (seeded) random step >= 4; torchrun restarts the ranks, they
  resume from the latest complete checkpoint (trainer.resume=auto) and end bitwise equal
  to an uninterrupted run, with the same logged losses;
- the scripts' command lines (DRY_RUN=1): overrides passed through untouched, options from
  flags or the environment, the NCCL flight recorder only when a GPU is present.

The two reference runs start in the background when the module starts, so they overlap
with the runs they are compared against. Every launch has a time limit, and a failure
or a timeout SIGKILLs all of its processes (the agent and its workers), so nothing hangs
the suite or outlives it.

Ports: a port picked free here (the rendezvous endpoint) or by torchrun itself (the
workers' store, see TORCH_DISABLE_SHARE_RDZV_TCP_STORE in launch/common.sh) can be taken by
another process before it is bound. A launch that fails that way (PORT_TAKEN in its log) is
started again, from a clean run directory and with a fresh port, at most LAUNCH_ATTEMPTS times.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from trainer import checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TIMEOUT_S = 240  # per launch; a healthy one takes seconds
TINY = ["model=tiny", "trainer.micro_batch_size=2", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.eval_batches=1", "trainer.progress=false", "trainer.device=cpu", "trainer.peak_tflops=1"]
MULTINODE_STEPS = 6
ELASTIC_STEPS = 12
ELASTIC_SEED = 7
LAUNCH_ATTEMPTS = 3
# a port bound by someone else between being picked and being bound: the TCP store's bind
# error, or (c10d rendezvous) the agents' fallback to a client of whatever holds the port
PORT_TAKEN = re.compile(r"EADDRINUSE|address already in use|connection to the C10d store has failed", re.I)


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_SILENT": "true", "FLIGHT_RECORDER": "0"}
    for k in list(env):  # the scripts' inputs and outputs: only what a test sets
        if k in ("DRY_RUN", "NNODES", "NPROC", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "RUN_ID", "RDZV_ENDPOINT", "RDZV_BACKEND", "MAX_RESTARTS", "LOCAL_ADDR", "RDZV_CONF",
                 "FR_DUMP_DIR", "FR_BUFFER_SIZE", "PET_RDZV_ID", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
                 "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE") \
                or k.startswith(("TORCH_FR_", "SLURM_", "SRUN_")):
            del env[k]
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(Exception):
    """A job failed because a port it was to bind had been taken (see PORT_TAKEN)."""


class Job:
    """A launch script in its own process group, output in a file (no pipe to fill).

    torchrun starts its workers in sessions of their own, so killing the agent's group
    leaves them running: every process of a job carries RINGTRAIN_TEST_JOB=<token> in its
    environment, and `kill` ends all of them, orphans included."""

    def __init__(self, name: str, args: list, log_dir: Path, env: dict):
        self.name = name
        self.token = f"{name}-{uuid.uuid4().hex}"
        self.log = log_dir / f"{name}.out"
        self._fh = open(self.log, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(["bash", *map(str, args)], cwd=ROOT, env={**env, "RINGTRAIN_TEST_JOB": self.token},
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.seconds: float | None = None  # wall time to exit, taken by a reaper thread
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.proc.wait()
        self.seconds = time.monotonic() - self.t0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _processes(self) -> list[int]:
        marker = f"RINGTRAIN_TEST_JOB={self.token}".encode()
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def kill(self) -> None:
        """SIGKILL for every process of the job (idempotent)."""
        for _ in range(3):  # a dying agent may still be starting a worker
            pids = self._processes()
            if self.proc.poll() is None:
                pids.append(self.proc.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._fh.close()

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def port_taken(self) -> bool:
        return bool(PORT_TAKEN.search(self.log.read_text(errors="replace")))

    def wait(self, timeout: float = TIMEOUT_S, port_retry: bool = False) -> "Job":
        """Waits for a clean exit; on a timeout or a failure kills the group and fails, or,
        with port_retry, raises PortTaken when the log says a port was taken."""
        left = max(1.0, timeout - (time.monotonic() - self.t0))
        try:
            rc = self.proc.wait(left)
        except subprocess.TimeoutExpired:
            self.kill()
            if port_retry and self.port_taken():
                raise PortTaken(self.name) from None
            pytest.fail(f"{self.name}: still running after {timeout} s, killed\n{self.tail()}")
        if self.seconds is None:  # the reaper thread has not run yet
            self.seconds = time.monotonic() - self.t0
        self._fh.close()
        if rc != 0:
            self.kill()
            if port_retry and self.port_taken():
                raise PortTaken(self.name)
            pytest.fail(f"{self.name}: exit {rc}\n{self.tail()}")
        return self


class Launch:
    """Jobs started together by `start(port, attempt)` (port: a fresh free one, for the jobs
    that need one), waited on together. A failure whose log shows a port taken by another
    process (PORT_TAKEN) starts them again with a fresh port, up to `attempts` in all;
    `start` must begin from a clean run directory."""

    def __init__(self, start, attempts: int = LAUNCH_ATTEMPTS):
        self._start, self.attempts, self.attempt = start, attempts, 1
        self.jobs: list[Job] = start(_free_port(), 1)

    def wait(self) -> list[Job]:
        while True:
            try:
                for job in self.jobs:
                    job.wait(port_retry=self.attempt < self.attempts)
                return self.jobs
            except PortTaken as taken:
                self.kill()
                print(f"\n{taken}: a port was taken before it was bound; attempt {self.attempt + 1}")
                self.attempt += 1
                self.jobs = self._start(_free_port(), self.attempt)

    def kill(self) -> None:
        for job in self.jobs:
            job.kill()


def _fresh(run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def _named(name: str, attempt: int) -> str:
    return name if attempt == 1 else f"{name}.attempt{attempt}"


def _metrics(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _assert_models_equal(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    differ = {k: (sa[k] - sb[k]).abs().max().item() for k in sa if not torch.equal(sa[k], sb[k])}
    assert not differ, f"tensors not bitwise equal (max abs difference): {differ}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def references(work):
    """The uninterrupted runs, started at once in the background: 4 ranks on one agent
    (MULTINODE_STEPS) and 2 ranks (ELASTIC_STEPS, checkpoints every 2 steps)."""
    cache = work / "cache"
    jobs = {  # --standalone: torchrun picks its ports itself (the port given here is unused)
        "four_ranks": Launch(lambda _, attempt: [Job(
            _named("four_ranks", attempt), [LAUNCH / "local.sh", "--nproc-per-node=4", *TINY, f"data.cache_dir={cache}",
                                            f"trainer.max_steps={MULTINODE_STEPS}",
                                            f"hydra.run.dir={_fresh(work / 'four_ranks')}"], work, _env())]),
        "straight": Launch(lambda _, attempt: [Job(
            _named("straight", attempt), [LAUNCH / "local.sh", *TINY, f"data.cache_dir={cache}",
                                          f"trainer.max_steps={ELASTIC_STEPS}", "trainer.ckpt_every=2",
                                          f"hydra.run.dir={_fresh(work / 'straight')}"], work,
            _env(NPROC_PER_NODE=2))]),
    }
    yield jobs
    for launch in jobs.values():
        launch.kill()


def test_two_agents_on_one_machine_equal_one_agent_with_four_ranks(work, references):
    run_dir = work / "two_agents"

    def start(port: int, attempt: int) -> list[Job]:
        run_id = f"rt-{uuid.uuid4().hex[:8]}"
        overrides = [*TINY, f"data.cache_dir={work / 'cache'}", f"trainer.max_steps={MULTINODE_STEPS}",
                     f"hydra.run.dir={_fresh(run_dir)}"]
        # the same launch two ways: options from the environment, and from flags
        return [
            Job(_named("agent_env", attempt), [LAUNCH / "multinode.sh", *overrides], work,
                _env(NNODES=2, NPROC_PER_NODE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RUN_ID=run_id)),
            Job(_named("agent_flags", attempt), [LAUNCH / "multinode.sh", "--nnodes=2", "--nproc-per-node", "2",
                                                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "--",
                                                 *overrides], work, _env()),
        ]

    launch = Launch(start)
    try:
        agents = launch.wait()
    finally:
        launch.kill()
    ref, = references["four_ranks"].wait()
    print(f"\ntwo agents: {max(a.seconds for a in agents):.1f} s; one agent, 4 ranks: {ref.seconds:.1f} s")

    log = (run_dir / "train.log").read_text()
    assert log.count("run dir") == 1 and "4 rank(s)" in log  # one job of 4 ranks, rank 0 alone logs
    assert not (run_dir / "checkpoints" / f".tmp_step_{MULTINODE_STEPS}").exists()
    _assert_models_equal(run_dir / f"checkpoints/step_{MULTINODE_STEPS}/model.pt",
                         work / f"four_ranks/checkpoints/step_{MULTINODE_STEPS}/model.pt")
    two, four = _metrics(run_dir), _metrics(work / "four_ranks")
    assert list(two) == list(range(1, MULTINODE_STEPS + 1))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == MULTINODE_STEPS  # rank 0 alone writes
    assert two == four


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (what `pgrep -P pid` prints), from /proc."""
    tasks = Path(f"/proc/{pid}/task")
    try:  # Linux >= 3.5 lists each thread's children
        lists = [t / "children" for t in tasks.iterdir()]
        if lists and lists[0].exists():
            kids = []
            for f in lists:
                try:
                    kids += [int(c) for c in f.read_text().split()]
                except OSError:
                    pass  # a thread that just ended
            return kids
    except OSError:
        return []  # pid is gone
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _worker_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _latest_complete_step(ckpt_root: Path) -> int:
    done = checkpoint.complete_checkpoints(ckpt_root)  # what trainer.resume=auto would pick
    return done[-1][0] if done else 0


def _watch_and_kill(job: Job, run_dir: Path, kill_after: int, victim_rank: int):
    """Watches the run directory; once a checkpoint >= kill_after is complete, SIGKILLs the
    worker of local rank victim_rank (a child of the torchrun agent, which local.sh exec'ed
    into), then notes the restarted workers' TORCHELASTIC_RESTART_COUNT until the job ends.
    Returns (killed pid or None, the latest complete step when it was killed, restart counts)."""
    killed = seen_step = None
    restart_counts: set[str] = set()
    while job.proc.poll() is None and time.monotonic() - job.t0 < TIMEOUT_S:
        if killed is None and _latest_complete_step(run_dir / "checkpoints") < kill_after:
            time.sleep(0.01)
            continue
        workers = {}
        for pid in _children(job.pid):
            env = _worker_env(pid)
            if "LOCAL_RANK" in env:
                workers[int(env["LOCAL_RANK"])] = (pid, env.get("TORCHELASTIC_RESTART_COUNT"))
        if killed is None and victim_rank in workers:
            seen_step = _latest_complete_step(run_dir / "checkpoints")
            killed = workers[victim_rank][0]
            os.kill(killed, signal.SIGKILL)
        elif killed is not None:
            restart_counts.update(count for pid, count in workers.values() if pid != killed)
        time.sleep(0.05)
    return killed, seen_step, restart_counts


def test_killed_worker_restarts_and_resumes_bitwise(work, references):
    rng = random.Random(ELASTIC_SEED)
    kill_after = rng.choice([4, 6])  # a complete checkpoint at or after this step triggers the kill
    victim_rank = rng.choice([0, 1])
    run_dir = work / "elastic"
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        retry = attempt < LAUNCH_ATTEMPTS
        job = Job(_named("elastic", attempt),
                  [LAUNCH / "local.sh", "--nproc-per-node", "2", *TINY, f"data.cache_dir={work / 'cache'}",
                   f"trainer.max_steps={ELASTIC_STEPS}", "trainer.ckpt_every=2", "trainer.resume=auto",
                   f"hydra.run.dir={_fresh(run_dir)}"], work, _env(MAX_RESTARTS=2))
        try:
            killed, seen_step, restart_counts = _watch_and_kill(job, run_dir, kill_after, victim_rank)
            if killed is not None:
                job.wait(port_retry=retry)
        except PortTaken:
            continue
        finally:
            job.kill()
        if retry and job.port_taken():  # torchrun's restarts absorbed a taken port: not the run set up here
            print(f"\nelastic: a port was taken before it was bound; attempt {attempt + 1}")
            continue
        break
    assert killed is not None, f"the run ended before a checkpoint >= step {kill_after}\n{job.tail()}"
    ref, = references["straight"].wait()
    print(f"\nkilled local rank {victim_rank} (pid {killed}) once step {seen_step} was saved; "
          f"restart counts seen {sorted(restart_counts)}; elastic run {job.seconds:.1f} s, "
          f"uninterrupted {ref.seconds:.1f} s")

    log = (run_dir / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log[-3000:]  # the restarted ranks, and only they, resumed
    resumed_at = int(resumed[0].rsplit("at step", 1)[1].split()[0])
    assert seen_step <= resumed_at < ELASTIC_STEPS, (seen_step, resumed_at)
    assert "1" in restart_counts, restart_counts  # the restarted workers' TORCHELASTIC_RESTART_COUNT
    _assert_models_equal(run_dir / f"checkpoints/step_{ELASTIC_STEPS}/model.pt",
                         work / f"straight/checkpoints/step_{ELASTIC_STEPS}/model.pt")
    assert _metrics(run_dir) == _metrics(work / "straight")  # records after the resume point re-logged


def test_a_launch_whose_port_was_taken_starts_again_with_a_fresh_port(tmp_path):
    ports = []

    def start(port, attempt):  # stand-ins for the launch scripts: the first two lose their port
        ports.append(port)
        script = "exit 0" if attempt == 3 else "echo 'DistNetworkError: ... name: EADDRINUSE'; exit 1"
        return [Job(f"stub{attempt}", ["-c", script], tmp_path, _env())]

    launch = Launch(start)
    jobs = launch.wait()
    assert (launch.attempt, len(ports), [j.name for j in jobs]) == (3, 3, ["stub3"])
    assert all(isinstance(p, int) and p > 0 for p in ports)
    # bounded: a port taken every time fails on the last attempt, with its log
    always = Launch(lambda port, attempt: [Job(f"busy{attempt}", ["-c", "echo 'address already in use'; exit 1"],
                                               tmp_path, _env())])
    with pytest.raises(pytest.fail.Exception, match=f"busy{LAUNCH_ATTEMPTS}: exit 1"):
        always.wait()
    # any other failure is not retried
    other = Launch(lambda port, attempt: [Job(f"other{attempt}", ["-c", "echo 'loss is nan'; exit 3"], tmp_path,
                                              _env())])
    with pytest.raises(pytest.fail.Exception, match="other1: exit 3"):
        other.wait()


def test_port_taken_matches_what_torch_says():
    """The errors a taken port gives: a TCP store's bind, and c10d rendezvous falling back
    to a client of a port nobody serves."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.api import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError) as bind:
            dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    assert PORT_TAKEN.search(str(bind.value)), bind.value
    with socket.socket() as bound:  # bound, not listening: what a client's outgoing port looks like
        bound.bind(("127.0.0.1", 0))
        params = RendezvousParameters("c10d", f"127.0.0.1:{bound.getsockname()[1]}", "rt", 1, 1, read_timeout=1)
        with pytest.raises(Exception) as client:
            create_backend(params)
    assert PORT_TAKEN.search(str(client.value)), client.value


# ---------------------------------------------------------------------------------------
# command lines (DRY_RUN=1 prints what a script would export and run)


def _dry(script: str, *args, path_first: Path | None = None, **env) -> tuple[dict, list[str]]:
    e = _env(DRY_RUN=1)
    del e["FLIGHT_RECORDER"]  # auto: on with a GPU (path_first holds a stub nvidia-smi)
    e.update({k: str(v) for k, v in env.items()})
    if path_first is not None:
        e["PATH"] = f"{path_first}:{e['PATH']}"
    r = subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], cwd="/", env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    exports = dict(shlex.split(line)[1].split("=", 1) for line in lines[:-1])
    return exports, shlex.split(lines[-1])


def _fail(script: str, *args, **env) -> str:
    r = subprocess.run(["bash", str(LAUNCH / script), *args], env=_env(DRY_RUN=1, **env), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    return r.stderr


ELASTIC = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # restarted ranks get a fresh store (common.sh)
TRICKY = ["attention=linear", "trainer.max_steps=7", "data.paths=[a b.txt,'c,d']", "+x.y=$HOME \"q\"",
          "logger.tags=[x]", "-m", "--cfg", "job"]


def _stub(dir_: Path, name: str, body: str) -> None:
    p = dir_ / name
    p.write_text("#!/usr/bin/env bash\n" + body + "\n")
    p.chmod(0o755)


@pytest.fixture(scope="module")
def no_gpu(work):
    d = work / "no_gpu"
    d.mkdir()
    _stub(d, "nvidia-smi", "exit 9")
    return d


@pytest.fixture(scope="module")
def gpu(work):
    d = work / "gpu"
    d.mkdir()
    _stub(d, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"')
    return d


def test_local_passes_overrides_untouched(no_gpu):
    exports, cmd = _dry("local.sh", "--", *TRICKY, path_first=no_gpu)
    assert exports == ELASTIC  # no GPU, no flight recorder
    i = cmd.index("trainer.train")
    assert cmd[:i + 1] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--max-restarts=0", "-m", "trainer.train"]
    assert cmd[i + 1:] == TRICKY
    # restarts: from the environment or a flag; trainer.resume=auto first, unless given
    _, cmd = _dry("local.sh", "a=1", path_first=no_gpu, MAX_RESTARTS=2, NPROC_PER_NODE=3)
    assert "--max-restarts=2" in cmd and "--nproc-per-node=3" in cmd and cmd[-2:] == ["trainer.resume=auto", "a=1"]
    _, cmd = _dry("local.sh", "--max-restarts", "1", "--nproc-per-node=5", "trainer.resume=none",
                  path_first=no_gpu, NPROC=3)
    assert "--max-restarts=1" in cmd and "--nproc-per-node=5" in cmd and cmd[-1:] == ["trainer.resume=none"]
    assert "must be a non-negative integer" in _fail("local.sh", MAX_RESTARTS="x")


def test_multinode_options_from_environment_or_flags(no_gpu):
    env = dict(NNODES=2, NPROC_PER_NODE=4, MASTER_ADDR="node0", MASTER_PORT=29411, RUN_ID="exp42", MAX_RESTARTS=3)
    _, from_env = _dry("multinode.sh", *TRICKY, path_first=no_gpu, **env)
    _, from_flags = _dry("multinode.sh", "--nnodes", "2", "--nproc-per-node=4", "--rdzv-endpoint", "node0:29411",
                         "--rdzv-id=exp42", "--max-restarts", "3", "--", *TRICKY, path_first=no_gpu)
    assert from_env == from_flags
    i = from_env.index("trainer.train")
    assert from_env[3:i - 1] == ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                                 "--rdzv-endpoint=node0:29411", "--rdzv-id=exp42", "--max-restarts=3"]
    assert from_env[i + 1:] == ["trainer.resume=auto", *TRICKY]
    # flags win over the environment; a loopback endpoint keeps the workers on loopback too
    _, cmd = _dry("multinode.sh", "--rdzv-id", "other", "trainer.resume=none", path_first=no_gpu,
                  **{**env, "MASTER_ADDR": "127.0.0.1"})
    assert "--rdzv-id=other" in cmd and "--local-addr=127.0.0.1" in cmd and cmd[-1] == "trainer.resume=none"
    assert "trainer.resume=auto" not in cmd
    _, cmd = _dry("multinode.sh", path_first=no_gpu, NNODES=2, RDZV_BACKEND="static", NODE_RANK=1,
                  RDZV_ENDPOINT="h:1", RUN_ID="r")
    assert "--rdzv-backend=static" in cmd and "--node-rank=1" in cmd
    assert "NNODES" in _fail("multinode.sh", MASTER_ADDR="h", RUN_ID="r")
    assert "RUN_ID" in _fail("multinode.sh", NNODES=2, MASTER_ADDR="h")
    assert "MASTER_ADDR" in _fail("multinode.sh", NNODES=2, RUN_ID="r")
    assert "NODE_RANK" in _fail("multinode.sh", NNODES=2, RUN_ID="r", MASTER_ADDR="h", RDZV_BACKEND="static")


def test_flight_recorder_only_with_a_gpu(gpu, no_gpu, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(NNODES=2, MASTER_ADDR="node0", RUN_ID="exp42")
    exports, cmd = _dry("multinode.sh", f"hydra.run.dir={run_dir}", path_first=gpu, **env)
    assert exports == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                       "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                       "TORCH_FR_DUMP_TEMP_FILE": f"{run_dir}/flight_recorder/rank_",
                       "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{run_dir}/flight_recorder/rank_", **ELASTIC}
    assert "--nproc-per-node=gpu" in cmd  # one rank per GPU by default
    exports, _ = _dry("multinode.sh", path_first=gpu, TORCH_FR_BUFFER_SIZE=50, **env)
    assert exports["TORCH_FR_BUFFER_SIZE"] == "50"  # a value already set is kept
    assert exports["TORCH_FR_DUMP_TEMP_FILE"] == f"{ROOT}/runs/train/exp42/flight_recorder/rank_"
    assert _dry("multinode.sh", path_first=no_gpu, **env)[0] == ELASTIC
    assert _dry("local.sh", path_first=gpu, FLIGHT_RECORDER=0)[0] == ELASTIC
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" in _dry("local.sh", path_first=no_gpu, FLIGHT_RECORDER=1)[0]


def test_slurm_runs_one_multinode_agent_per_node(work, no_gpu):
    stubs = work / "slurm"
    stubs.mkdir()
    _stub(stubs, "scontrol", '[[ "$1 $2" == "show hostnames" ]] && printf "gpu-%s\\n" 17 18 19')
    # srun: record its options, then run the task once (as on one of the nodes)
    _stub(stubs, "srun", f'echo "$@" > {stubs}/srun_args; while [[ "$1" == --* ]]; do shift; done; exec "$@"')
    e = _env(DRY_RUN=1, SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="gpu-[17-19]", SLURM_JOB_NUM_NODES=3,
             SLURM_JOB_ID=4242, SLURM_JOB_NAME="exp7", SLURM_CPUS_PER_TASK=16,
             MASTER_ADDR="127.0.0.1")  # left over in the submitting shell: not the allocation's
    e["PATH"] = f"{stubs}:{no_gpu}:{e['PATH']}"
    r = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *TRICKY], cwd="/", env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert ["--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-17:24242", "--rdzv-id=exp7"] == \
        [a for a in cmd if a.startswith(("--nnodes", "--rdzv"))]
    assert cmd[cmd.index("trainer.train") + 1:] == ["trainer.resume=auto", *TRICKY]
    srun = (stubs / "srun_args").read_text().split()
    assert "--ntasks-per-node=1" in srun and "--nodes=3" in srun and "launch/multinode.sh" in srun


def test_accelerate_command_line(no_gpu):
    exports, cmd = _dry("accelerate.sh", *TRICKY, path_first=no_gpu, RUN_ID="acc1")
    assert exports == {"PET_RDZV_ID": "acc1", **ELASTIC}  # torchrun's run id, hence runs/train/acc1
    i = cmd.index("trainer.train")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and cmd[i - 1] == "-m"
    assert cmd[i + 1:] == ["engine=accelerate", *TRICKY]
    opts = cmd[3:i - 1]
    assert "--multi_gpu" in opts and opts[opts.index("--num_processes") + 1] == "2"
    _, cmd = _dry("accelerate.sh", "--nproc-per-node", "4", path_first=no_gpu, NNODES=2, NODE_RANK=1,
                  MASTER_ADDR="node0")
    opts = cmd[3:cmd.index("trainer.train") - 1]
    assert opts[opts.index("--num_processes") + 1] == "8"  # all machines' processes
    assert opts[opts.index("--machine_rank") + 1] == "1" and opts[opts.index("--main_process_ip") + 1] == "node0"
