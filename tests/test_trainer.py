"""The trainer end to end: torchrun with 2 ranks and plain python, metrics, checkpoints,
exact resume, wandb offline, multirun, and bad input failing before anything starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.structured import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "trainer.micro_batch_size=4", "trainer.progress=false", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def _run(args, n=None, timeout=300, env=None):
    launcher = [sys.executable] if n is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    r = subprocess.run(launcher + ["-m", "trainer.train", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "WANDB_SILENT": "true", **(env or {})})
    return r


def _ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_log_evaluate_checkpoint(tmp_path, cache):
    run_dir = tmp_path / "run"
    _ok(_run(TINY + [f"data.cache_dir={cache}", "trainer.max_steps=40", "trainer.log_every=5",
                     "trainer.eval_every=20", "trainer.eval_batches=2", "trainer.ckpt_every=10",
                     "trainer.keep_last=2", "optim.lr=3e-3", f"hydra.run.dir={run_dir}"], n=2))
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu",
                    "comm_bytes_per_step", "comm_wait_s_per_step"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
        assert r["comm_bytes_per_step"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    assert {r["step"] for r in rows if "val_loss" in r} == {20, 40}
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in done] == [30, 40]  # keep_last=2
    files = set(os.listdir(done[-1][1]))
    assert {"meta.json", "model.pt", "optimizer.pt", "rank_0.pt", "rank_1.pt"} <= files
    assert (run_dir / "config.yaml").is_file()
    log = (run_dir / "train.log").read_text()
    assert log.count("run dir") == 1  # rank 0 alone writes the log
    from trainer.export import export, load_exported
    model = load_exported(export(done[-1][1], tmp_path / "model.pt"))
    saved = torch.load(done[-1][1] / "model.pt")
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="CHECKPOINT"):
        export(run_dir / "checkpoints" / "step_7", tmp_path / "none.pt")


def test_resume_sees_exactly_the_uninterrupted_run(tmp_path, cache):
    common = TINY + [f"data.cache_dir={cache}", "trainer.max_steps=12", "trainer.log_every=2",
                     "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.grad_accum=2",
                     "attention=performer", "attention.redraw_interval=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(_run(common + [f"hydra.run.dir={straight}"], n=2))
    _ok(_run(common + [f"hydra.run.dir={resumed}", "trainer.stop_after_steps=6"], n=2))
    assert [s for s, _ in checkpoint.complete_checkpoints(resumed / "checkpoints")] == [6]
    with open(resumed / "metrics.jsonl", "a") as fh:  # what a launch dying after step 8 leaves
        fh.write('{"step": 8, "loss": 99.0}\n{"step": 10, "lo')
    _ok(_run(common + [f"hydra.run.dir={resumed}", "trainer.resume=auto"], n=2))
    a = torch.load(straight / "checkpoints/step_12/model.pt")
    b = torch.load(resumed / "checkpoints/step_12/model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = {r["step"]: r["loss"] for r in _metrics(straight)}
    lb = {r["step"]: r["loss"] for r in _metrics(resumed)}
    assert lb == la  # steps 2..6 from the first launch, 8..12 from the resumed one


@pytest.fixture(scope="module")
def one_rank_double_batch(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("one-rank")
    _ok(_run(TRAJECTORY + [f"data.cache_dir={cache}", "trainer.micro_batch_size=8", f"hydra.run.dir={run_dir}"]))
    return [r["loss"] for r in _metrics(run_dir)]


TRAJECTORY = [a for a in TINY if not a.startswith("trainer.micro_batch_size")] + [
    "trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1"]


# rhd and tree train the same way through DataParallel; tests/test_data_parallel.py checks
# every algorithm's DDP step against a single process, so the trainer runs ring and native
@pytest.mark.parametrize("algorithm", ["ring", "native"])
def test_two_ranks_follow_one_rank_with_double_batch(tmp_path, cache, one_rank_double_batch, algorithm):
    # rank r takes windows r, r+2, ... of the epoch's permutation, so the two ranks' batches
    # of 4 are exactly the one rank's batch of 8: the trajectories may differ only by rounding
    _ok(_run(TRAJECTORY + [f"data.cache_dir={cache}", "trainer.micro_batch_size=4",
                           f"parallel.algorithm={algorithm}", f"hydra.run.dir={tmp_path}"], n=2))
    two = [r["loss"] for r in _metrics(tmp_path)]
    one = one_rank_double_batch
    assert len(two) == len(one) == 20
    rel = max(abs(a - b) / abs(b) for a, b in zip(two, one))
    assert rel <= 1e-5, (rel, two, one)


def test_every_experiment_composes_and_runs_two_steps(tmp_path, cache):
    for exp in sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")):
        run_dir = tmp_path / exp
        _ok(_run([f"experiment={exp}", f"data.cache_dir={cache}", "trainer.max_steps=2", "trainer.log_every=1",
                  "trainer.eval_batches=1", "trainer.progress=false", f"hydra.run.dir={run_dir}"]))
        assert [r["step"] for r in _metrics(run_dir)] == [1, 2]
        assert checkpoint.latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "step_2"


def test_plain_python_world_of_one_with_wandb_offline(tmp_path, cache):
    run_dir = tmp_path / "run"
    _ok(_run(TINY + [f"data.cache_dir={cache}", "trainer.max_steps=4", "trainer.log_every=2",
                     "trainer.eval_batches=1", "logger=wandb", f"hydra.run.dir={run_dir}"],
             env={"WANDB_MODE": "offline"}))
    assert [r["step"] for r in _metrics(run_dir)] == [2, 4]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert _metrics(run_dir)[0]["comm_bytes_per_step"] == 0  # one rank sends nothing


def test_multirun_sweeps_attention(tmp_path, cache):
    sweep = tmp_path / "sweep"
    _ok(_run(["-m", "attention=softmax,linear,gau"] + TINY +
             [f"data.cache_dir={cache}", "trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_batches=1",
              f"hydra.sweep.dir={sweep}"]))
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 3
    kinds = {json.loads((p / "metrics.jsonl").read_text().splitlines()[-1])["step"] for p in runs}
    assert kinds == {2}


# bad values are a table in tests/test_robustness.py (in-process, plus one real launch);
# a misspelt key fails inside Hydra itself, so it gets its own real launch here
@pytest.mark.parametrize("override, key", [("trainer.max_stepz=3", "max_stepz")])
def test_bad_config_stops_before_any_work(tmp_path, override, key):
    run_dir = tmp_path / "run"
    r = _run([override, f"hydra.run.dir={run_dir}"], n=2, timeout=120)
    assert r.returncode != 0
    assert key in r.stdout + r.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_incomplete_checkpoints_are_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_5").mkdir(parents=True)
    (root / "step_5" / "meta.json").write_text("{}")
    (root / "step_9").mkdir()               # crashed before meta.json
    (root / ".tmp_step_12").mkdir()         # crashed mid-write
    assert checkpoint.latest(root) == root / "step_5"
    with pytest.raises(ValueError, match="trainer.resume"):
        checkpoint.load(root / "step_9", model=torch.nn.Linear(1, 1), rank=0,
                        world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def ddp_trajectories(tmp_path_factory, cache):
    out = {}
    for n in (2, 4):
        run_dir = tmp_path_factory.mktemp(f"ddp{n}")
        _ok(_run(ZERO + [f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}"], n=n))
        out[n] = (_metrics(run_dir), torch.load(run_dir / "checkpoints/step_20/model.pt"))
    return out


ZERO = TRAJECTORY + ["trainer.micro_batch_size=2", "trainer.grad_accum=2"]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, cache):
    """(n, stage) -> run directory of a 20-step ZeRO run, launched once per module."""
    runs = {}

    def get(n, stage):
        if (n, stage) not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}-{n}")
            _ok(_run(ZERO + [f"data.cache_dir={cache}", f"parallel=zero{stage}", f"hydra.run.dir={run_dir}"], n=n))
            runs[n, stage] = run_dir
        return runs[n, stage]
    return get


# every stage on 2 ranks and stage 3 on 4 through the trainer; tests/test_zero.py checks every
# stage on 2, 3 and 4 ranks against a single process inside the worker pools
@pytest.mark.parametrize("n, stage", [(2, 1), (2, 2), (2, 3), (4, 3)])
def test_zero_follows_ddp(cache, ddp_trajectories, zero_runs, n, stage):
    tmp_path = zero_runs(n, stage)
    ref_rows, ref_model = ddp_trajectories[n]
    rows = _metrics(tmp_path)
    rel = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows, ref_rows))
    assert len(rows) == len(ref_rows) == 20 and rel <= 1e-5, rel
    got = torch.load(tmp_path / "checkpoints/step_20/model.pt")
    for k in ref_model:
        torch.testing.assert_close(got[k], ref_model[k], rtol=1e-4, atol=1e-5)
    # sharding shows in the per-rank model-state bytes: each stage keeps less than DDP
    mem = lambda r: r["mem_params_bytes"] + r["mem_grads_bytes"] + r["mem_optimizer_bytes"]  # noqa: E731
    assert mem(rows[-1]) < mem(ref_rows[-1])


def test_zero3_resume_is_exact(tmp_path, cache, zero_runs):
    common = ZERO + [f"data.cache_dir={cache}", "parallel=zero3"]
    straight, resumed = zero_runs(2, 3), tmp_path / "resumed"
    _ok(_run(common + [f"hydra.run.dir={resumed}", "trainer.stop_after_steps=10"], n=2))
    _ok(_run(common + [f"hydra.run.dir={resumed}", "trainer.resume=auto"], n=2))
    a = torch.load(straight / "checkpoints/step_20/model.pt")
    b = torch.load(resumed / "checkpoints/step_20/model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    as_ddp = [a for a in common if a != "parallel=zero3"] + ["parallel=ddp"]
    r = _run(as_ddp + [f"hydra.run.dir={resumed}", "trainer.resume=auto"], n=2)
    assert r.returncode != 0 and "saved with parallel=zero3" in r.stdout + r.stderr


@pytest.mark.parametrize("stage", [3])  # stages 1 and 2 write their optimizer the same way
def test_zero_resume_on_another_world_size(tmp_path, cache, zero_runs, stage):
    # 4 ranks x 2 sequences x 2 micro-steps, then 2 ranks x 4 x 2: the same global batches, so
    # the resumed run must continue the uninterrupted 4-rank trajectory (up to the order of sums)
    common = ZERO + [f"data.cache_dir={cache}", f"parallel=zero{stage}"]
    straight, resharded = zero_runs(4, stage), tmp_path / "resharded"
    _ok(_run(common + ["trainer.stop_after_steps=10", f"hydra.run.dir={resharded}"], n=4))
    _ok(_run([a for a in common if a != "trainer.micro_batch_size=2"] +
             ["trainer.micro_batch_size=4", "trainer.resume=auto", f"hydra.run.dir={resharded}"], n=2))
    la = {r["step"]: r["loss"] for r in _metrics(straight)}
    lb = {r["step"]: r["loss"] for r in _metrics(resharded)}
    assert la.keys() == lb.keys() and max(abs(la[k] - lb[k]) / la[k] for k in la) <= 1e-5
    a = torch.load(straight / "checkpoints/step_20/model.pt")
    b = torch.load(resharded / "checkpoints/step_20/model.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_deepspeed_engine_follows_native_zero(tmp_path, cache, zero_runs):
    # the comparison engine trains the same model on the same batches: same trajectory
    _ok(_run(ZERO + [f"data.cache_dir={cache}", "parallel=zero3", "engine=deepspeed",
                     f"hydra.run.dir={tmp_path}"], n=2))
    ds, native = _metrics(tmp_path), _metrics(zero_runs(2, 3))
    assert len(ds) == len(native) == 20
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(ds, native)) <= 1e-5
    assert ds[-1]["comm_bytes_per_step"] is None and ds[-1]["peak_mem_mb"] > 0
    assert (tmp_path / "checkpoints" / "step_20" / "deepspeed").is_dir()


@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_accelerate_engine_follows_native(tmp_path, cache, zero_runs, ddp_trajectories, parallel):
    if parallel == "zero3" and not torch.cuda.is_available():
        pytest.skip("Accelerate runs FSDP on GPUs only; the refusal is in tests/test_robustness.py's table")
    _ok(_run(ZERO + [f"data.cache_dir={cache}", f"parallel={parallel}", "engine=accelerate",
                     f"hydra.run.dir={tmp_path}"], n=2))
    ref = ddp_trajectories[2][0] if parallel == "ddp" else _metrics(zero_runs(2, 3))
    got = _metrics(tmp_path)
    assert len(got) == len(ref) == 20
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(got, ref)) <= 1e-5
    assert (tmp_path / "checkpoints" / "step_20" / "accelerate").is_dir()


def test_checkpoint_of_another_model_or_missing_shard_is_refused(tmp_path, cache, zero_runs):
    ckpt = zero_runs(2, 3) / "checkpoints" / "step_20"
    base = [f"data.cache_dir={cache}", "parallel=zero3", "trainer.progress=false", f"trainer.resume={ckpt}"]
    r = _run(base + ["model=small", f"hydra.run.dir={tmp_path / 'other'}"], n=2, timeout=120)
    assert r.returncode != 0 and "another model" in r.stdout + r.stderr
    broken = tmp_path / "step_20"
    import shutil
    shutil.copytree(ckpt, broken)
    next((broken / "optimizer").glob("__1_*.distcp")).unlink()  # rank 1's optimizer shard
    with pytest.raises(ConfigError, match="damaged checkpoint: optimizer/__1_0.distcp is missing"):
        checkpoint.load(broken, model=torch.nn.Linear(1, 1), rank=0, world_size=2, device=torch.device("cpu"))


def test_fp16_logs_the_loss_scale_and_resume_restores_the_scaler(tmp_path, cache):
    # growth every 3 steps from 2^16: the scale moves (grows, and backs off on overflows),
    # so an interrupted run only matches if the scale and its growth tracker come back
    common = TINY + [f"data.cache_dir={cache}", "precision=fp16", "parallel=zero2", "precision.growth_interval=3",
                     "trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(_run(common + [f"hydra.run.dir={straight}"], n=2))
    _ok(_run(common + [f"hydra.run.dir={resumed}", "trainer.stop_after_steps=5"], n=2))
    _ok(_run(common + [f"hydra.run.dir={resumed}", "trainer.resume=auto"], n=2))
    rows, again = _metrics(straight), _metrics(resumed)
    scales = [r["loss_scale"] for r in rows]
    assert len(set(scales)) > 2, scales  # the scale did move
    assert [(r["loss_scale"], r["skipped_steps"], r["loss"]) for r in again] == \
        [(r["loss_scale"], r["skipped_steps"], r["loss"]) for r in rows]
    a = torch.load(straight / "checkpoints/step_12/model.pt")
    b = torch.load(resumed / "checkpoints/step_12/model.pt")
    assert all(v.dtype == torch.float32 and torch.equal(v, b[k]) for k, v in a.items())  # float32 masters


MOE = TRAJECTORY + ["model.moe.num_experts=4", "model.moe.capacity_factor=0", "model.moe.aux_loss_coef=0"]


@pytest.fixture(scope="module")
def moe_one_rank(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("moe-one")
    _ok(_run(MOE + [f"data.cache_dir={cache}", "trainer.micro_batch_size=8", f"hydra.run.dir={run_dir}"]))
    return run_dir


@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_moe_on_2x2_ranks_follows_one_rank_with_the_full_batch(tmp_path, cache, moe_one_rank, parallel):
    # 4 ranks = 2 data-parallel x 2 expert-parallel, each 2 sequences, against 1 rank with all 8.
    # Dropless routing and no aux loss: both are per-rank quantities (capacity from the rank's
    # tokens; f_i * P_i is not linear in the batch), so only with them off is the 1-rank run the
    # exact reference; z-loss is a token mean and stays on.
    two_d, one = tmp_path / "two_d", moe_one_rank
    _ok(_run(MOE + [f"data.cache_dir={cache}", "trainer.micro_batch_size=2", "parallel.ep_size=2",
                    f"parallel={parallel}", f"hydra.run.dir={two_d}"], n=4))
    a, b = _metrics(two_d), _metrics(one)
    assert len(a) == len(b) == 20
    assert max(abs(x["loss"] - y["loss"]) / y["loss"] for x, y in zip(a, b)) <= 1e-5
    assert max(abs(x["grad_norm"] - y["grad_norm"]) / y["grad_norm"] for x, y in zip(a, b)) <= 1e-4
    for key in ("moe_tokens_per_expert_min", "moe_tokens_per_expert_mean", "moe_tokens_per_expert_max",
                "moe_dropped_frac", "moe_aux_loss", "moe_z_loss", "a2a_bytes_per_step", "a2a_wait_s_per_step"):
        assert key in a[-1], key
    assert a[-1]["a2a_bytes_per_step"] > 0 and b[-1]["a2a_bytes_per_step"] == 0 and a[-1]["moe_dropped_frac"] == 0
    ckpt = two_d / "checkpoints/step_20"
    if parallel == "ddp":
        assert {"optimizer_ep0.pt", "optimizer_ep1.pt"} <= set(os.listdir(ckpt))
    x, y = torch.load(ckpt / "model.pt"), torch.load(one / "checkpoints/step_20/model.pt")
    assert x.keys() == y.keys()  # the consolidated file holds every expert
    for k in y:
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5)
