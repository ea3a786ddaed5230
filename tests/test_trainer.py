"""The trainer end to end: torchrun with 2 ranks and plain python, metrics, checkpoints,
exact resume, wandb offline, multirun, and bad input failing before anything starts.

Launches are the expensive part, so runs are shared: a 20-step reference run also writes a
checkpoint at step 10 (trainer.ckpt_every=10), and a resume test starts another run
directory from that explicit checkpoint (trainer.resume=<run>/checkpoints/step_10) and
must end bitwise equal to the uninterrupted run. One test really stops a launch
(trainer.stop_after_steps) and relaunches it with trainer.resume=auto; comparison runs
of the other engines stop after 10 of 20 scheduled steps the same way."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointManager
from trainer.structured import ConfigError
from trainer.config import ZERO_STAGES

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


def _load(path, *, world_size=2, **layout):
    """trainer/checkpoint.py's load into a throwaway model, as a run with this layout would."""
    layout = {"engine": "native", "parallel": "ddp", "ep_size": 1, **layout}
    return CheckpointManager(Path(path).parent, rank=0, world_size=world_size, layout=layout).load(
        Path(path), model=torch.nn.Linear(1, 1), device=torch.device("cpu"))


def _sharded_keys(step_dir) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader
    return sorted(FileSystemReader(str(Path(step_dir) / "optimizer")).read_metadata().state_dict_metadata)


def _read_sharded(step_dir, keys) -> dict:
    """Plain (unsharded) tensors of a checkpoint's DCP state, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(str(Path(step_dir) / "optimizer")).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(Path(step_dir) / "optimizer"), no_dist=True)
    return state


def _max_rel(rows, ref, key="loss"):
    assert rows and len(rows) <= len(ref) and [r["step"] for r in rows] == [r["step"] for r in ref[:len(rows)]]
    return max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(rows, ref))


def _assert_resumed_exactly(straight, resumed, at, end):
    """`resumed` started from straight's step-`at` checkpoint: bitwise the same model at `end`
    and the same loss at every step it logged (the steps after `at`)."""
    assert f"at step {at}" in (resumed / "train.log").read_text()
    a = torch.load(straight / f"checkpoints/step_{end}/model.pt")
    b = torch.load(resumed / f"checkpoints/step_{end}/model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = {r["step"]: r["loss"] for r in _metrics(straight) if r["step"] > at}
    lb = {r["step"]: r["loss"] for r in _metrics(resumed)}
    assert la and lb == la


def test_two_ranks_train_log_evaluate_checkpoint(tmp_path, cache):
    run_dir = tmp_path / "run"
    _ok(_run(TINY + [f"data.cache_dir={cache}", "trainer.max_steps=40", "trainer.log_every=5",
                     "trainer.eval_every=20", "trainer.eval_batches=2", "trainer.ckpt_every=10",
                     "trainer.keep_last=2", "optim.lr=3e-3", f"hydra.run.dir={run_dir}"], n=2))
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                    "comm_bytes_per_step", "comm_wait_s_per_step"):
            assert isinstance(r.get(key), (int, float)) and math.isfinite(r[key]), (key, r)  # a finite number
        assert r["comm_bytes_per_step"] > 0
        assert "mfu" in r and r["mfu"] is None  # a CPU has no honest peak unless trainer.peak_tflops says
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    assert {r["step"] for r in rows if "val_loss" in r} == {20, 40}
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in done] == [30, 40]  # keep_last=2
    files = set(os.listdir(done[-1][1]))
    assert {"meta.json", "model.pt", "optimizer", "rank_0.pt", "rank_1.pt"} <= files
    assert all(k.endswith((".exp_avg", ".exp_avg_sq", ".step")) for k in _sharded_keys(done[-1][1]))
    assert (run_dir / "config.yaml").is_file()
    log = (run_dir / "train.log").read_text()
    assert log.count("run dir") == 1  # rank 0 alone writes the log
    assert "peak none on CPU: MFU is null unless trainer.peak_tflops is set" in log
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
    # the experiment's model, attention, precision and loop as composed; one sequence per
    # micro-step (composing and running is the point, not the batch: halves the launch here)
    for exp in sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")):
        run_dir = tmp_path / exp
        _ok(_run([f"experiment={exp}", f"data.cache_dir={cache}", "trainer.max_steps=2", "trainer.log_every=1",
                  "trainer.eval_batches=1", "trainer.micro_batch_size=1", "trainer.progress=false",
                  f"hydra.run.dir={run_dir}"]))
        assert [r["step"] for r in _metrics(run_dir)] == [1, 2]
        assert checkpoint.latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "step_2"


def test_plain_python_world_of_one_with_wandb_offline(tmp_path, cache):
    run_dir = tmp_path / "run"
    _ok(_run(TINY + [f"data.cache_dir={cache}", "trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_batches=1",
                     "logger=wandb", "trainer.peak_tflops=0.5", f"hydra.run.dir={run_dir}"],
             env={"WANDB_MODE": "offline"}))
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    # with a peak given, MFU is the model FLOP/s over it: the same FLOPs per token in every record
    per_token = [r["mfu"] * 0.5e12 / r["tokens_per_s"] for r in rows]
    assert per_token[0] > 0 and per_token[0] == pytest.approx(per_token[1], rel=1e-9)
    assert "peak 0.50 TFLOP/s (trainer.peak_tflops)" in (run_dir / "train.log").read_text()
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
    assert all([r["step"] for r in _metrics(p)] == [1, 2] for p in runs)
    from omegaconf import OmegaConf
    kinds = sorted(OmegaConf.load(p / "config.yaml").attention.kind for p in runs)  # each run's resolved config
    assert kinds == ["gau", "linear", "softmax"]
    assert sorted(k for p in runs for k in kinds if f"attention {k} " in (p / "train.log").read_text()) == kinds


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
        _load(root / "step_9", world_size=1)


@pytest.fixture(scope="module")
def ddp_trajectories(tmp_path_factory, cache):
    out = {}
    for n in (2, 4):
        run_dir = tmp_path_factory.mktemp(f"ddp{n}")
        _ok(_run(ZERO + [f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}"], n=n))
        out[n] = (_metrics(run_dir), torch.load(run_dir / "checkpoints/step_20/model.pt"))
    return out


# 20 steps with a checkpoint at step 10 (kept with the final one: keep_last=2) to resume from
ZERO = TRAJECTORY + ["trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.ckpt_every=10"]


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
    assert len(rows) == len(ref_rows) == 20 and _max_rel(rows, ref_rows) <= 1e-5
    got = torch.load(tmp_path / "checkpoints/step_20/model.pt")
    for k in ref_model:
        torch.testing.assert_close(got[k], ref_model[k], rtol=1e-4, atol=1e-5)
    # sharding shows in the per-rank model-state bytes: each stage keeps less than DDP
    mem = lambda r: r["mem_params_bytes"] + r["mem_grads_bytes"] + r["mem_optimizer_bytes"]  # noqa: E731
    assert mem(rows[-1]) < mem(ref_rows[-1])


def test_zero3_resume_is_exact(tmp_path, cache, zero_runs):
    straight = zero_runs(2, 3)
    step_10 = straight / "checkpoints" / "step_10"
    _ok(_run(ZERO + [f"data.cache_dir={cache}", "parallel=zero3", f"trainer.resume={step_10}",
                     f"hydra.run.dir={tmp_path}"], n=2))
    _assert_resumed_exactly(straight, tmp_path, at=10, end=20)
    with pytest.raises(ConfigError, match="saved with parallel=zero3"):  # its optimizer is laid out otherwise
        _load(step_10, parallel="ddp")


@pytest.mark.parametrize("stage", [3])  # stages 1 and 2 write their optimizer the same way
def test_zero_resume_on_another_world_size(tmp_path, cache, zero_runs, stage):
    # 4 ranks x 2 sequences x 2 micro-steps, then 2 ranks x 4 x 2: the same global batches, so
    # the resumed run must continue the uninterrupted 4-rank trajectory (up to the order of sums)
    straight = zero_runs(4, stage)
    _ok(_run([a for a in ZERO if a != "trainer.micro_batch_size=2"] +
             [f"data.cache_dir={cache}", f"parallel=zero{stage}", "trainer.micro_batch_size=4",
              f"trainer.resume={straight / 'checkpoints' / 'step_10'}", f"hydra.run.dir={tmp_path}"], n=2))
    assert "at step 10" in (tmp_path / "train.log").read_text()
    la = {r["step"]: r["loss"] for r in _metrics(straight) if r["step"] > 10}
    lb = {r["step"]: r["loss"] for r in _metrics(tmp_path)}
    assert la.keys() == lb.keys() and max(abs(la[k] - lb[k]) / la[k] for k in la) <= 1e-5
    a = torch.load(straight / "checkpoints/step_20/model.pt")
    b = torch.load(tmp_path / "checkpoints/step_20/model.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, cache):
    """(engine, parallel, precision) -> run directory of a 2-rank ZERO run by that engine:
    20 steps for fp32 zero3 (DeepSpeed) and fp32 ddp (Accelerate), the runs resumed from;
    the others stop after 10 of the 20 scheduled steps (the same learning rates)."""
    runs = {}

    def get(engine, parallel, precision="fp32"):
        key = engine, parallel, precision
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("-".join(key))
            full = key in (("deepspeed", "zero3", "fp32"), ("accelerate", "ddp", "fp32"))
            _ok(_run(ZERO + [f"data.cache_dir={cache}", f"engine={engine}", f"parallel={parallel}",
                             f"precision={precision}", f"hydra.run.dir={run_dir}"]
                     + ([] if full else ["trainer.stop_after_steps=10"]), n=2))
            runs[key] = run_dir
        return runs[key]
    return get


def _native(parallel, ddp_trajectories, zero_runs):
    return ddp_trajectories[2][0] if parallel == "ddp" else _metrics(zero_runs(2, ZERO_STAGES[parallel]))


def _assert_deepspeed_ran_stage(run_dir, steps, stage):
    """DeepSpeed ran the stage asked for: its own optimizer's record of it (kept in each rank's
    checkpoint state), one partition per rank."""
    from trainer.engines.deepspeed import decode
    for r in (0, 1):
        local = torch.load(run_dir / "checkpoints" / f"step_{steps}" / f"rank_{r}.pt", weights_only=True)["engine"]
        opt = decode(local["optimizer"])
        if stage == 0:  # a plain torch optimizer state
            assert "zero_stage" not in opt and set(opt) == {"state", "param_groups"}, sorted(opt)
            continue
        counts = opt["partition_count"]  # one per parameter group (stage 3: one number)
        assert int(opt["zero_stage"]) == stage and set(counts if isinstance(counts, list) else [counts]) == {2}, r


# the same model, batches, AdamW and clipping with DeepSpeed moving the gradients: the native
# trajectory up to the order of float32 sums (ddp -> DeepSpeed stage 0). Stage 2 runs in the bf16
# test below; stage 1 is DeepSpeed's stage-2 optimizer without gradient partitioning, and its
# mapping is read by DeepSpeed's own config parser in test_deepspeed_config_maps_stage_...
@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_deepspeed_engine_follows_native(cache, engine_runs, zero_runs, ddp_trajectories, parallel):
    run_dir = engine_runs("deepspeed", parallel)
    ds, native = _metrics(run_dir), _native(parallel, ddp_trajectories, zero_runs)
    assert len(ds) == (20 if parallel == "zero3" else 10) and _max_rel(ds, native) <= 1e-5
    assert ds[-1]["comm_bytes_per_step"] is None and ds[-1]["peak_mem_mb"] > 0
    _assert_deepspeed_ran_stage(run_dir, len(ds), ZERO_STAGES[parallel])
    if parallel == "zero3":
        got, ref = torch.load(run_dir / "checkpoints/step_20/model.pt"), ddp_trajectories[2][1]
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


# bf16 keeps 8 significant bits: unit roundoff u = 2^-9 (0.2 %) against float32's 2^-24. The logged
# loss is a float32 mean over 4096 tokens of float32 cross-entropies of bf16-rounded logits, so the
# independent roundings average out and the mean stays well within one rounding u of the fp32 loss:
# 10 steps here drift 5e-4 with bf16 weights (DeepSpeed), 5e-5 with autocast over float32 weights
# (Accelerate). u is also 1/80 of what the loss falls in these steps (0.74 of 5.3), so a run that
# does not train, or trains on other batches, fails.
BF16_REL = 2.0**-9


def _assert_bf16_follows(rows, fp32_rows):
    assert len(rows) == 10
    fell = fp32_rows[0]["loss"] - fp32_rows[9]["loss"]
    assert fell > 10 * BF16_REL * fp32_rows[9]["loss"], fell
    assert _max_rel(rows, fp32_rows) <= BF16_REL
    assert any(a["loss"] != b["loss"] for a, b in zip(rows, fp32_rows))  # bf16 arithmetic did happen


def test_deepspeed_bf16_follows_native_fp32(cache, engine_runs, zero_runs):
    # DeepSpeed's bf16 (bf16 weights, float32 master copy in its ZeRO optimizer) against native fp32
    run_dir = engine_runs("deepspeed", "zero2", "bf16")
    _assert_bf16_follows(_metrics(run_dir), _metrics(zero_runs(2, 2)))
    _assert_deepspeed_ran_stage(run_dir, 10, 2)


def test_deepspeed_resume_is_exact(tmp_path, cache, engine_runs):
    straight = engine_runs("deepspeed", "zero3")
    _ok(_run(ZERO + [f"data.cache_dir={cache}", "engine=deepspeed", "parallel=zero3",
                     f"trainer.resume={straight / 'checkpoints' / 'step_10'}", f"hydra.run.dir={tmp_path}"], n=2))
    _assert_resumed_exactly(straight, tmp_path, at=10, end=20)


def test_deepspeed_config_maps_stage_precision_and_loss_scaler(monkeypatch):
    # DeepSpeed runs fp16 on GPUs only, so the mapping is read here by DeepSpeed's own config
    # parser and its loss scaler is driven next to ringtrain's through overflows
    import deepspeed.comm
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler as DeepSpeedScaler
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    from parallel.loss_scale import DynamicLossScaler
    from trainer.config import ParallelConfig, PrecisionConfig, TrainConfig
    from trainer.engines.deepspeed import deepspeed_config as ds_config

    def deepspeed_config(tc: TrainConfig) -> dict:
        tc.validate()
        return ds_config(tc.parallel, tc.precision, tc.optim, tc.trainer)

    for name, stage in [("ddp", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3)]:
        assert deepspeed_config(TrainConfig(parallel=ParallelConfig(name=name)))["zero_optimization"]["stage"] == stage
    bf16 = deepspeed_config(TrainConfig(precision=PrecisionConfig(name="bf16")))
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    # bucket sizes in elements, rounded up to DeepSpeed's start alignment (2): 0.05 MiB is 13107.2
    odd = deepspeed_config(TrainConfig(parallel=ParallelConfig(name="zero2", bucket_mb=0.05)))["zero_optimization"]
    assert odd["reduce_bucket_size"] == odd["allgather_bucket_size"] == 13108
    p = PrecisionConfig(name="fp16", init_scale=2.0**10, growth_interval=5, hysteresis=3, min_scale=4.0)
    cfg = deepspeed_config(TrainConfig(precision=p))
    assert not cfg["bf16"]["enabled"]
    fp16 = DeepSpeedFP16Config(**cfg["fp16"])
    assert fp16.enabled and fp16.loss_scale == 0  # 0: dynamic scaling
    args = fp16.dynamic_loss_scale_args()
    assert args == {"init_scale": 1024, "scale_window": 5, "delayed_shift": 3, "consecutive_hysteresis": True,
                    "min_scale": 4}, args
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda: 0)  # its overflow message asks for the rank
    theirs = DeepSpeedScaler(**args, raise_error_at_min_scale=False)
    ours = DynamicLossScaler(init_scale=p.init_scale, growth_interval=p.growth_interval, hysteresis=p.hysteresis,
                             min_scale=p.min_scale)
    # isolated overflows (tolerated: hysteresis refills on clean steps), runs of them (back off
    # after the first 2), clean stretches (growth), and a long run down to the floor
    overflows = [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1] + [0] * 12 + [1] * 12
    ds, rt = [], []
    for o in overflows:
        theirs.update_scale(bool(o))
        ours.update(bool(o))
        ds.append(float(theirs.cur_scale))
        rt.append(ours.scale)
    # every rule was exercised: three isolated overflows at 14, 16, 18 tolerated, growth, the floor
    assert rt[13] == rt[18] == 512.0 and max(rt) == 2048.0 and min(rt) == 4.0, rt
    # every back-off and every tolerated overflow alike; DeepSpeed counts its growth window from
    # the step after an overflow, so its scale doubles one clean step after ringtrain's
    for i, (a, b) in enumerate(zip(ds, rt)):
        assert a == b or (b == 2 * rt[i - 1] and a == rt[i - 1] and ds[i + 1] == rt[i + 1]), (i, ds, rt)
    assert sum(a != b for a, b in zip(ds, rt)) == sum(b == 2 * a for a, b in zip(rt, rt[1:]))
    # what DeepSpeed cannot express is refused, naming the key
    for key, value in [("init_scale", 3000.0), ("growth_factor", 4.0), ("backoff_factor", 0.25), ("min_scale", 1.5)]:
        bad = PrecisionConfig(**{**dataclasses.asdict(p), key: value})
        with pytest.raises(ValueError, match=f"precision.{key}="):  # before any process group
            TrainConfig(engine="deepspeed", precision=bad).validate()


@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_accelerate_engine_follows_native(cache, engine_runs, zero_runs, ddp_trajectories, parallel):
    if parallel == "zero3" and not torch.cuda.is_available():
        pytest.skip("Accelerate runs FSDP on GPUs only; the refusal is in tests/test_robustness.py's table")
    run_dir = engine_runs("accelerate", parallel)
    got = _metrics(run_dir)
    assert len(got) == (20 if parallel == "ddp" else 10)
    assert _max_rel(got, _native(parallel, ddp_trajectories, zero_runs)) <= 1e-5
    keys = _sharded_keys(run_dir / "checkpoints" / f"step_{len(got)}")  # its optimizer, through DCP
    assert "lm_head.weight.exp_avg" in keys or "tok_emb.weight.exp_avg" in keys, keys


def test_accelerate_bf16_follows_its_fp32_run(cache, engine_runs):
    # Accelerate's bf16 is autocast over float32 weights (native bf16 keeps bf16 weights with
    # float32 masters), so its reference is its own fp32 run: the same bf16 rounding bound
    _assert_bf16_follows(_metrics(engine_runs("accelerate", "ddp", "bf16")),
                         _metrics(engine_runs("accelerate", "ddp")))


def test_accelerate_resume_is_exact(tmp_path, cache, engine_runs):
    straight = engine_runs("accelerate", "ddp")
    _ok(_run(ZERO + [f"data.cache_dir={cache}", "engine=accelerate", "parallel=ddp",
                     f"trainer.resume={straight / 'checkpoints' / 'step_10'}", f"hydra.run.dir={tmp_path}"], n=2))
    _assert_resumed_exactly(straight, tmp_path, at=10, end=20)


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
        _load(broken, parallel="zero3")


def test_fp16_logs_the_loss_scale_and_resume_restores_the_scaler(tmp_path, cache):
    # growth every 3 steps from 2^16: the scale moves (grows, and backs off on overflows),
    # so a run resumed at step 5 only matches if the scale and its growth tracker come back
    common = TINY + [f"data.cache_dir={cache}", "precision=fp16", "parallel=zero2", "precision.growth_interval=3",
                     "trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(_run(common + ["trainer.ckpt_every=5", "trainer.keep_last=0", f"hydra.run.dir={straight}"], n=2))
    _ok(_run(common + [f"trainer.resume={straight / 'checkpoints' / 'step_5'}", f"hydra.run.dir={resumed}"], n=2))
    rows, again = _metrics(straight), _metrics(resumed)
    scales = [r["loss_scale"] for r in rows]
    assert len(set(scales)) > 2, scales  # the scale did move
    assert len(set(scales[5:])) > 1, scales  # ... after the checkpoint too
    assert [r["step"] for r in again] == list(range(6, 13))
    assert [(r["loss_scale"], r["skipped_steps"], r["loss"]) for r in again] == \
        [(r["loss_scale"], r["skipped_steps"], r["loss"]) for r in rows[5:]]
    a = torch.load(straight / "checkpoints/step_12/model.pt")
    b = torch.load(resumed / "checkpoints/step_12/model.pt")
    assert all(v.dtype == torch.float32 and torch.equal(v, b[k]) for k, v in a.items())  # float32 masters


MOE = TRAJECTORY + ["model.moe.num_experts=4", "model.moe.capacity_factor=0", "model.moe.aux_loss_coef=0"]
# 4 ranks = 2 data-parallel x 2 expert-parallel, each 2 sequences; a checkpoint at step 10 to resume from
MOE_2X2 = MOE + ["trainer.micro_batch_size=2", "parallel.ep_size=2", "trainer.ckpt_every=10"]


@pytest.fixture(scope="module")
def moe_one_rank(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("moe-one")
    _ok(_run(MOE + [f"data.cache_dir={cache}", "trainer.micro_batch_size=8", f"hydra.run.dir={run_dir}"]))
    return run_dir


@pytest.fixture(scope="module")
def moe_2x2(tmp_path_factory, cache):
    """parallel -> run directory of the 20-step 2 x 2 MoE run, launched once per module."""
    runs = {}

    def get(parallel):
        if parallel not in runs:
            run_dir = tmp_path_factory.mktemp(f"moe-2x2-{parallel}")
            _ok(_run(MOE_2X2 + [f"data.cache_dir={cache}", f"parallel={parallel}", f"hydra.run.dir={run_dir}"], n=4))
            runs[parallel] = run_dir
        return runs[parallel]
    return get


@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_moe_on_2x2_ranks_follows_one_rank_with_the_full_batch(cache, moe_one_rank, moe_2x2, parallel):
    # 4 ranks = 2 data-parallel x 2 expert-parallel, each 2 sequences, against 1 rank with all 8.
    # Dropless routing and no aux loss: both are per-rank quantities (capacity from the rank's
    # tokens; f_i * P_i is not linear in the batch), so only with them off is the 1-rank run the
    # exact reference; z-loss is a token mean and stays on.
    two_d, one = moe_2x2(parallel), moe_one_rank
    a, b = _metrics(two_d), _metrics(one)
    assert len(a) == len(b) == 20
    assert _max_rel(a, b) <= 1e-5 and _max_rel(a, b, "grad_norm") <= 1e-4
    for key in ("moe_tokens_per_expert_min", "moe_tokens_per_expert_mean", "moe_tokens_per_expert_max",
                "moe_dropped_frac", "moe_aux_loss", "moe_z_loss", "a2a_bytes_per_step", "a2a_wait_s_per_step"):
        assert key in a[-1], key
    assert a[-1]["a2a_bytes_per_step"] > 0 and b[-1]["a2a_bytes_per_step"] == 0 and a[-1]["moe_dropped_frac"] == 0
    ckpt = two_d / "checkpoints/step_20"
    x, y = torch.load(ckpt / "model.pt"), torch.load(one / "checkpoints/step_20/model.pt")
    assert x.keys() == y.keys()  # the consolidated file holds every expert
    for k in y:
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_moe_resume_with_ep2_is_exact(tmp_path, cache, moe_2x2, parallel):
    # each expert slice has its own optimizer state (DCP keys naming the slice: DDP by parameter,
    # ZeRO by unit); resuming must load every one of them
    straight = moe_2x2(parallel)
    step_10 = straight / "checkpoints" / "step_10"
    keys = _sharded_keys(step_10)
    ep0 = [k for k in keys if ".ep0." in k and k.endswith(".exp_avg")]
    assert ep0 and all(k.replace(".ep0.", ".ep1.") in keys for k in ep0), keys
    if parallel == "ddp":  # plain tensors: the slices' states differ
        state = _read_sharded(step_10, ep0 + [k.replace(".ep0.", ".ep1.") for k in ep0])
        assert any(not torch.equal(state[k], state[k.replace(".ep0.", ".ep1.")]) for k in ep0)
    _ok(_run(MOE_2X2 + [f"data.cache_dir={cache}", f"parallel={parallel}", f"trainer.resume={step_10}",
                        f"hydra.run.dir={tmp_path}"], n=4))
    _assert_resumed_exactly(straight, tmp_path, at=10, end=20)
