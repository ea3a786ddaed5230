"""Context parallelism in the trainer: cp runs follow the single-rank run on the same data,
compose with data parallelism, ZeRO, bf16 and activation checkpointing, resume with another
cp_size, report their traffic, and bad layouts stop before any process group.

The layer-level equalities (every kind, cp 2-4, float64) are tests/test_cp_attention.py and
tests/test_ring_attention.py; here whole runs are compared, so the launches are shared: one
single-rank reference per (attention, precision), and each cp run is compared with it.
The tiny model trains 20 steps in float32: a cp run differs from one rank only in the order
of its sums (attention merged across ranks, gradients averaged over cp), hence 1e-5 relative.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.activation_checkpoint import apply_activation_checkpointing, checkpointed_blocks
from trainer.config import check_launch, load_config

from test_train_config import _compose

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model=tiny", "trainer.micro_batch_size=4", "trainer.progress=false", "optim.warmup_steps=2",
          "trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1"]


def _run(args, n=None, timeout=300):
    launcher = [sys.executable] if n is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return subprocess.run(launcher + ["-m", "trainer.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WANDB_SILENT": "true"})


def _ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [r["loss"] for r in _metrics(run_dir)]


def _max_rel(a, b):
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


PLAN = {  # name: (overrides, ranks; None = plain python)
    "one": ([], None),
    "cp2": (["parallel.cp_size=2", "trainer.ckpt_every=10"], 2),
    "cp2_full_ac": (["parallel.cp_size=2", "trainer.activation_checkpointing=full"], 2),
    "cp2_zero2": (["parallel.cp_size=2", "parallel=zero2", "trainer.activation_checkpointing=selective"], 2),
    "one_batch8": (["trainer.micro_batch_size=8"], None),
    "dp2_cp2": (["parallel.cp_size=2"], 4),
    "one_bf16": (["precision=bf16"], None),
    "cp2_bf16": (["precision=bf16", "parallel.cp_size=2"], 2),
    "one_linear": (["attention=linear", "attention.chunk_size=24"], None),
    "cp2_linear": (["attention=linear", "attention.chunk_size=24", "parallel.cp_size=2"], 2),
}


class Runs:
    """Launches each run of PLAN the first time a test asks for it, once per module."""

    def __init__(self, tmp_path_factory):
        self.factory = tmp_path_factory
        self.base = COMMON + [f"data.cache_dir={tmp_path_factory.mktemp('data-cache')}"]
        self._dirs: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._dirs:
            extra, n = PLAN[name]
            run_dir = self.factory.mktemp(name)
            _ok(_run(self.base + extra + [f"hydra.run.dir={run_dir}"], n=n))
            self._dirs[name] = run_dir
        return self._dirs[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


@pytest.mark.parametrize("cp_run, ref", [("cp2", "one"), ("cp2_linear", "one_linear"),
                                         ("dp2_cp2", "one_batch8"), ("cp2_zero2", "one")])
def test_cp_follows_one_rank(runs, cp_run, ref):
    # dp2_cp2: 2 replicas of 4 sequences each read exactly the one rank's batch of 8 (rank r takes
    # windows r, r+2, ... of the epoch's order); cp_zero2 also recomputes every other block
    rel = _max_rel(_losses(runs[cp_run]), _losses(runs[ref]))
    assert rel <= 1e-5, rel


def test_cp_bf16_follows_the_bf16_rank(runs):
    # bf16 rounds every matmul's output to 8 bits of mantissa (2^-8 relative); attention merged
    # across ranks rounds in a different order, so the bound is a few of those at the loss's
    # scale, and it must still be far tighter than the gap to the fp32 run
    cp, one, fp32 = _losses(runs["cp2_bf16"]), _losses(runs["one_bf16"]), _losses(runs["one"])
    rel = _max_rel(cp, one)
    assert rel <= 2e-2, rel
    assert _max_rel(one, fp32) > 0  # the bf16 runs really ran in bf16


def test_full_activation_checkpointing_changes_no_loss(runs):
    # the recomputation replays the same kernels on the same inputs: bitwise on CPU
    assert _losses(runs["cp2_full_ac"]) == _losses(runs["cp2"])


def test_cp_metrics_and_log_line(runs):
    rows = _metrics(runs["cp2"])
    assert all(r["cp_bytes_per_step"] > 0 and r["cp_wait_s_per_step"] >= 0 for r in rows)
    # ring attention, tiny model (2 layers, B=4, T=64, d=64, float32), K=2: one hop carries K and V
    # of T/2 tokens; per layer forward 1 hop, backward 1 hop of K/V and 2 of dK/dV
    hop = 2 * 4 * 32 * 64 * 4
    assert [r["cp_bytes_per_step"] for r in rows] == [2 * 4 * hop] * len(rows)
    # full recomputation repeats each layer's forward hop in backward
    ac = _metrics(runs["cp2_full_ac"])
    assert [r["cp_bytes_per_step"] for r in ac] == [2 * 5 * hop] * len(ac)
    assert "cp 2 (balanced: chunks c and 2K-1-c)" in (runs["cp2"] / "train.log").read_text()
    assert "cp_bytes_per_step" not in _metrics(runs["one"])[0]


def test_resume_cp2_on_one_rank_continues_the_run(runs, tmp_path):
    # parameters are replicated over cp, so the step-10 checkpoint of the cp2 run loads on one rank
    # (cp 1) and goes on as the single-rank run does
    step10 = runs["cp2"] / "checkpoints" / "step_10"
    _ok(_run(runs.base + [f"trainer.resume={step10}", f"hydra.run.dir={tmp_path}"]))
    resumed = _metrics(tmp_path)
    assert [r["step"] for r in resumed] == list(range(11, 21))
    rel = _max_rel([r["loss"] for r in resumed], _losses(runs["one"])[10:])
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("overrides, world, keys", [
    (["parallel.cp_size=3", "model.seq_len=96"], 4, ["parallel.cp_size=3", "world size 4"]),
    (["parallel.cp_size=2", "model.seq_len=66"], 2, ["model.seq_len=66", "2 x parallel.cp_size"]),
    (["parallel.cp_size=2", "attention=gau", "attention.chunk_size=48"], 2,
     ["model.seq_len", "attention.chunk_size"]),
    (["parallel.cp_size=2", "attention=transnormer", "attention.block_size=48"], 2,
     ["attention.block_size", "attention.diag_layers"]),
    (["parallel.cp_size=2", "model.moe.num_experts=4", "parallel.ep_size=2"], 4,
     ["parallel.cp_size=2", "parallel.ep_size=2"]),
    (["parallel.cp_size=2", "model.moe.num_experts=4"], 2, ["parallel.cp_size=2", "model.moe.num_experts=4"]),
    (["parallel.cp_size=2", "engine=deepspeed"], 2, ["parallel.cp_size=2", "engine=deepspeed"]),
    (["trainer.activation_checkpointing=full", "engine=accelerate"], 2,
     ["trainer.activation_checkpointing=full", "engine=accelerate"]),
    (["parallel.cp_size=0"], 2, ["parallel.cp_size"]),
])
def test_bad_cp_layouts_name_the_keys(overrides, world, keys):
    with pytest.raises(ValueError) as e:
        check_launch(load_config(_compose(overrides)), world_size=world, cuda=False)
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_bad_cp_layout_exits_2_before_any_process_group(tmp_path):
    r = _run(COMMON + ["parallel.cp_size=2", "model.seq_len=66", f"hydra.run.dir={tmp_path}"], n=2)
    assert r.returncode != 0 and "model.seq_len=66" in r.stderr and "Traceback" not in r.stderr.split(
        "ringtrain: config error")[0][-200:], r.stderr[-3000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_checkpointed_blocks_and_bitwise_gradients():
    from models.config import AttentionConfig, ModelConfig
    from models.transformer import DecoderLM

    assert checkpointed_blocks(4, "full") == [0, 1, 2, 3]
    assert checkpointed_blocks(5, "selective") == [0, 2, 4]
    assert checkpointed_blocks(3, "none") == []
    with pytest.raises(ValueError, match="trainer.activation_checkpointing"):
        checkpointed_blocks(3, "some")
    cfg = ModelConfig(vocab_size=64, seq_len=32, d_model=32, n_layers=3, n_heads=2, dropout=0.1)
    torch.manual_seed(0)
    plain = DecoderLM(cfg, AttentionConfig())
    idx = torch.randint(0, 64, (2, 32))
    grads = {}
    for mode in ("none", "full", "selective"):
        model = DecoderLM(cfg, AttentionConfig())
        model.load_state_dict(plain.state_dict())
        assert apply_activation_checkpointing(list(model.blocks), mode) == checkpointed_blocks(3, mode)
        calls = [0, 0, 0]  # an attention's hooks fire again when its block is recomputed
        for i, block in enumerate(model.blocks):
            block.attn.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        torch.manual_seed(1)  # dropout: the recomputation must replay the forward's draws
        _, loss = model(idx, idx)
        loss.backward()
        assert calls == [1 + (i in checkpointed_blocks(3, mode)) for i in range(3)], (mode, calls)
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for mode in ("full", "selective"):
        assert all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"])), mode
