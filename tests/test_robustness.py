"""Failing well: a table of bad configurations refused before any process group with one
line naming the key and value; non-finite losses stopped or skipped; damaged checkpoints
skipped; a run killed while saving leaves the previous checkpoint loadable."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import trainer.train  # noqa: F401  registers the schema
from trainer import checkpoint
from trainer.checkpoint import CheckpointManager
from trainer.structured import ConfigError
from trainer.train import check_config, load_checked_data

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "trainer.micro_batch_size=2", "trainer.progress=false", "trainer.eval_batches=1",
        "trainer.eval_every=0", "trainer.log_every=1"]

# (overrides, what the one-line message must contain: the key and the offending value)
BAD = [
    (["attention.kind=softmx"], ["attention.kind", "softmx"]),
    (["parallel.algorithm=butterfly"], ["parallel.algorithm", "butterfly"]),
    (["precision.name=fp8"], ["precision.name", "fp8"]),
    (["trainer.grad_accum=0"], ["trainer.grad_accum", "0"]),
    (["trainer.micro_batch_size=-2"], ["trainer.micro_batch_size", "-2"]),
    (["trainer.max_steps=0"], ["trainer.max_steps", "0"]),
    (["optim.lr=-1"], ["optim.lr", "-1"]),
    (["optim.beta2=1.5"], ["optim.beta2", "1.5"]),
    (["model.n_heads=3"], ["model.n_heads", "3"]),
    (["model.d_model=0"], ["model.d_model", "0"]),
    (["parallel.bucket_mb=0"], ["parallel.bucket_mb", "0"]),
    (["parallel.window=1"], ["parallel.window", "1"]),
    (["parallel.ep_size=0"], ["parallel.ep_size", "0"]),
    (["data.val_fraction=2.0"], ["data.val_fraction", "2.0"]),
    (["data=text", "data.paths=[/no/such/corpus]"], ["data.paths", "/no/such/corpus"]),
    (["logger._target_=os.system"], ["logger._target_", "os.system"]),
    (["precision.backoff_factor=2"], ["precision.backoff_factor", "2"]),
    (["precision.hysteresis=0"], ["precision.hysteresis", "0"]),
    (["model.moe.num_experts=2", "model.moe.top_k=3"], ["model.moe.top_k", "3"]),
    (["model.moe.num_experts=6", "parallel.ep_size=4"], ["model.moe.num_experts=6", "parallel.ep_size=4"]),
    (["model.moe.num_experts=4", "parallel.ep_size=4"], ["parallel.ep_size=4", "world size 2"]),  # WORLD_SIZE=2
    (["engine=accelerate", "parallel=zero1"], ["engine=accelerate", "parallel=zero1"]),
    (["engine=accelerate", "parallel=zero3"], ["engine=accelerate", "parallel=zero3", "needs a GPU"]),
    (["engine=deepspeed", "precision=fp16"], ["engine=deepspeed", "precision=fp16", "needs a GPU"]),
    (["trainer.resume=/no/such/step_3"], ["trainer.resume", "/no/such/step_3"]),
    (["trainer.device=cuda"], ["trainer.device=cuda"]),
    (["trainer.on_nonfinite=ignore"], ["trainer.on_nonfinite", "ignore"]),
    (["parallel.timeout_s=0"], ["parallel.timeout_s", "0"]),
    (["engine=deepspeed", "precision=fp16", "precision.growth_factor=4"], ["precision.growth_factor=4"]),
    # the data's size, checked before any process group too (the validation split is 0.5 % of it)
    (["model=tiny", "model.seq_len=100000"], ["model.seq_len=100000", "validation split", "data.val_fraction"]),
    (["model=tiny", "trainer.micro_batch_size=300000"], ["trainer.micro_batch_size=300000", "training split"]),
]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("overrides, words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configuration_is_refused_naming_key_and_value(monkeypatch, tmp_path, cache, overrides, words):
    if torch.cuda.is_available() and any(w in ("needs a GPU", "trainer.device=cuda") for w in words):
        pytest.skip("a GPU is visible")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would for 2 ranks
    with pytest.raises(ConfigError) as e:  # what train() checks before init_process_group
        load_checked_data(check_config(_compose(overrides + [f"data.cache_dir={cache}"]), tmp_path))
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def _launch(args, n=2, timeout=120, log_dir=None):
    logs = [f"--log-dir={log_dir}", "--redirects=3"] if log_dir else []  # each rank's console to its own files
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *logs,
           "-m", "trainer.train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _rank0_console(log_dir: Path) -> str:
    (err,) = log_dir.rglob("attempt_0/0/stderr.log")
    (out,) = log_dir.rglob("attempt_0/0/stdout.log")
    return out.read_text() + err.read_text()


@pytest.mark.parametrize("override, start", [
    ("parallel.bucket_mb=-1", "ringtrain: config error: parallel.bucket_mb must be > 0, got -1.0"),
    ("model.seq_len=100000", "ringtrain: config error: the validation split (data.val_fraction) has "),
])
def test_a_real_launch_prints_one_line_and_no_traceback(tmp_path, cache, override, start):
    r = _launch([override, f"data.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"], log_dir=tmp_path / "logs")
    assert r.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", r.stderr), r.stderr[-2000:]  # the ranks' status 2
    console = _rank0_console(tmp_path / "logs").strip().splitlines()
    assert len(console) == 1 and console[0].startswith(start), console  # one line, no traceback
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_naming_the_step(tmp_path, cache, mode):
    # lr 1e30: the first update makes the weights huge, the next gradients inf
    r = _train_one(TINY + [f"data.cache_dir={cache}", "optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_steps=4",
                           f"trainer.on_nonfinite={mode}", f"hydra.run.dir={tmp_path}"])
    out = r.stdout + r.stderr
    if mode == "stop":
        assert r.returncode == 3 and "Traceback" not in out, out[-3000:]
        assert "ringtrain: stopped: non-finite gradients at step 2" in out, out[-3000:]
        assert "trainer.on_nonfinite=stop" in out
    else:
        assert r.returncode == 0, out[-3000:]
        assert "non-finite gradients at step 2" in out and "step skipped" in out
        rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [x["skipped_steps"] for x in rows] == [0, 1, 2, 3]


def _train_one(args, timeout=120):
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_damaged_checkpoint_is_reported_and_skipped_and_keep_last_prunes(tmp_path, cache):
    common = TINY + [f"data.cache_dir={cache}", "trainer.ckpt_every=2", "trainer.keep_last=2",
                     f"hydra.run.dir={tmp_path}"]
    r = _train_one(common + ["trainer.max_steps=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [4, 6]  # step_2 pruned
    model = root / "step_6" / "model.pt"
    with open(model, "r+b") as fh:  # really truncated
        fh.truncate(model.stat().st_size // 2)
    assert "truncated" in checkpoint.verify(root / "step_6")
    r = _train_one(common + ["trainer.max_steps=8", "trainer.resume=auto"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "skipping checkpoint" in out and "step_6" in out and "resumed from" in out and "at step 4" in out
    assert checkpoint.verify(root / "step_8") is None


def _half_written_save(root: Path, after_step: int) -> Path | None:
    """A `.tmp_step_<N>/` (N > after_step) with files in it and no meta.json: a save under way."""
    for d in root.glob(".tmp_step_*"):
        try:
            names = os.listdir(d)
        except FileNotFoundError:  # renamed to step_<N> meanwhile
            continue
        if int(d.name.rsplit("_", 1)[1]) > after_step and names and "meta.json" not in names:
            return d
    return None


def test_a_run_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path, cache):
    # a checkpoint every step; the moment a save is seen half written the process is frozen
    # (SIGSTOP), the save checked still half written (else it goes on: SIGCONT, look again),
    # and only then killed: the kill always lands inside a save, after a complete one
    common = TINY + [f"data.cache_dir={cache}", "model=small", "trainer.ckpt_every=1", "trainer.keep_last=3",
                     "trainer.max_steps=40", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *common], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "checkpoints"
    caught = None
    try:
        deadline = time.monotonic() + 120
        while caught is None:
            assert proc.poll() is None, "the run ended before a save was caught half written"
            assert time.monotonic() < deadline, "no half-written save seen in 120 s"
            half = _half_written_save(root, after_step=2)
            if half is None:
                time.sleep(0.005)
                continue
            os.kill(proc.pid, signal.SIGSTOP)
            if _half_written_save(root, after_step=2) == half:
                caught = half  # frozen with the save half written
            else:
                os.kill(proc.pid, signal.SIGCONT)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    step = int(caught.name.rsplit("_", 1)[1])
    assert caught.is_dir() and not (caught / "meta.json").exists() and os.listdir(caught)  # the debris is left
    assert not (root / f"step_{step}").exists()
    with pytest.raises(ConfigError, match="trainer.resume"):  # the half checkpoint cannot be loaded
        CheckpointManager(root, rank=0, world_size=1).load(caught, model=torch.nn.Linear(1, 1),
                                                           device=torch.device("cpu"))
    done = checkpoint.complete_checkpoints(root)
    assert done[-1][0] == step - 1 and all(checkpoint.verify(p) is None for _, p in done)
    assert checkpoint.latest(root) == root / f"step_{step - 1}"
    # resume=auto continues from the previous complete checkpoint and saves over the debris
    r = _train_one(common + [f"trainer.max_steps={step + 1}", "trainer.resume=auto"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"at step {step - 1}" in r.stdout + r.stderr
    assert not list(root.glob(".tmp_step_*"))
    assert [s for s, _ in checkpoint.complete_checkpoints(root)][-2:] == [step, step + 1]
    assert all(checkpoint.verify(root / f"step_{s}") is None for s in (step, step + 1))
