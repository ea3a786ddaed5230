"""The kept mutants: each one breaks a mechanism on purpose, and the tests named for it must fail.

    python tests/mutants.py                 # every mutant (a few minutes)
    python tests/mutants.py --list          # names, files and target tests
    python tests/mutants.py NAME [NAME ...] # only these
    python tests/mutants.py --no-baseline   # skip the check that the targets pass unmutated
    python tests/mutants.py --jobs 1        # one at a time (default 2, each in its own tree copy)

The tree (the files git tracks plus untracked ones it does not ignore) is copied into a
temporary directory, once per job. For each mutant, `old` (which must occur exactly once in
`file`) is replaced by `new`, only the mutant's target tests run there (`pytest -x`),
and the file is restored. A mutant is *killed* when pytest reports failing tests (exit
1); a mutant whose targets pass *survived*; a collection error, a usage error or the
time limit count as *error* (not killed: a mutant must break behaviour, not syntax).
Before the mutants, the union of the targets runs once on the unmutated copy and must
pass, or no kill would mean anything. Exit status 0 only if every mutant was killed.

Run it before you stop on any change that touches what a mutant covers, and add a
mutant (with the test that kills it) for every mechanism you build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 600  # per pytest run


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str                  # relative to the repository root
    old: str                   # occurs exactly once in file
    new: str
    tests: tuple[str, ...]     # pytest node ids (files or single tests) that must fail
    breaks: str                # the mechanism, in a few words


MUTANTS: list[Mutant] = [
    # -- collectives ------------------------------------------------------------------------
    Mutant("ring-piece-bounds", "parallel/collectives/ring.py",
           "    bounds = split_bounds(inp.numel(), tp.size)\n    ring_reduce_scatter_pieces",
           "    bounds = [min(b + 1, inp.numel()) if 0 < i < tp.size else b\n"
           "              for i, b in enumerate(split_bounds(inp.numel(), tp.size))]\n    ring_reduce_scatter_pieces",
           ("tests/test_collectives.py::test_default_tuning_large_buffers[2]",),
           "ring reduce-scatter's piece bounds shifted by one element"),
    Mutant("all-to-all-splits-swapped", "parallel/collectives/api.py",
           "impl(tp, out, _flat(input), outs, ins, tuning)", "impl(tp, out, _flat(input), ins, outs, tuning)",
           ("tests/test_collectives.py::test_all_to_all_splits_that_differ_from_their_transpose[ring]",),
           "all-to-all input and output split sizes swapped"),
    Mutant("transport-counts-one-send-per-post", "parallel/collectives/transport.py",
           "        for t, dst in sends:\n            nbytes = t.numel() * t.element_size()\n",
           "        for t, dst in sends[:1]:\n            nbytes = t.numel() * t.element_size()\n",
           ("tests/test_collectives.py::test_bytes_sent_match_each_algorithms_traffic[3]",),
           "the transport counts only the first send of a post (all-to-all, tree broadcast)"),
    Mutant("native-all-reduce-bytes-one-phase", "parallel/collectives/native.py",
           "    tp.stats.bytes_sent += _ring_bytes(flat, tp.size, 2)\n",
           "    tp.stats.bytes_sent += _ring_bytes(flat, tp.size, 1)\n",
           ("tests/test_collectives.py::test_bytes_sent_match_each_algorithms_traffic[2]",),
           "native all-reduce's byte estimate counts one phase instead of reduce-scatter + all-gather"),
    Mutant("deadline-skips-all-gather", "parallel/collectives/communicator.py",
           "        if self.timeout_s is not None:\n            plan = self._guarded(op, algo, self.seq, plan)\n",
           "        if self.timeout_s is not None and op != \"all_gather\":\n"
           "            plan = self._guarded(op, algo, self.seq, plan)\n",
           ("tests/test_hang.py::test_survivors_fail_with_one_line[all_gather-ring-kill-sync]",),
           "the communicator's deadline is not applied to all_gather"),
    Mutant("native-wait-ignores-deadline", "parallel/collectives/transport.py",
           "            if peer is None:\n                _wait_bounded(work, left)\n",
           "            if False:\n                _wait_bounded(work, left)\n",
           ("tests/test_hang.py::test_survivors_fail_with_one_line[reduce_scatter-native-sleep-async]",),
           "native collectives waited with wait(timeout), which gloo's reduce-scatter ignores (hangs ~HANG_S)"),
    # -- models -------------------------------------------------------------------------------
    Mutant("rope-positions-off-by-one", "models/rope.py",
           "positions = torch.arange(seq_len, device=device, dtype=torch.float32)",
           "positions = torch.arange(1, seq_len + 1, device=device, dtype=torch.float32)",
           ("tests/test_attention.py",),
           "RoPE positions start at 1 instead of 0"),
    Mutant("linear-state-not-carried", "models/attention/causal_linear.py",
           "                state = state + kc.transpose(-1, -2) @ vc\n",
           "                state = kc.transpose(-1, -2) @ vc\n",
           ("tests/test_attention.py",),
           "linear attention's key-value state not carried across chunks"),
    # -- data parallel, ZeRO, precision -------------------------------------------------------
    Mutant("mesh-reuses-the-world-group", "parallel/mesh.py",
           "            if g is dist.group.WORLD:\n", "            if False:\n",
           ("tests/test_mesh.py::test_ep_over_the_whole_world_gets_a_group_of_its_own",),
           "ep spanning every rank shares the default group with dp: concurrent gloo messages can cross"),
    Mutant("zero3-never-frees", "parallel/zero/stage3.py",
           "            unit.full.untyped_storage().resize_(0)\n            self._gathered.discard(unit.index)",
           "            self._gathered.discard(unit.index)",
           ("tests/test_zero.py::test_zero3_frees_gathered_parameters",),
           "ZeRO-3 keeps gathered parameters instead of freeing them"),
    Mutant("zero3-no-backward-regather", "parallel/zero/stage3.py",
           "        self.grad_sync.reap()\n        for u in self._block_units(bi):\n            self._wait(u)\n",
           "        self.grad_sync.reap()\n",
           ("tests/test_zero.py::test_zero_matches_single_process[3-2]",),
           "ZeRO-3 does not gather a block's parameters again before its backward"),
    Mutant("zero3-frees-after-reduce-scatter", "parallel/zero/stage3.py",
           "        if unit.block >= 0:\n            self.free(unit)", "        pass",
           ("tests/test_zero.py::test_zero3_frees_gathered_parameters",),
           "ZeRO-3 holds a block's parameters until the step ends instead of freeing them once staged"),
    Mutant("loss-not-unscaled", "parallel/precision.py",
           "            torch._foreach_mul_(grads, 1.0 / scaler.scale)", "            pass",
           ("tests/test_precision.py::test_mixed_precision_step_matches_single_process[2-ddp-fp16-half]",),
           "fp16 gradients not divided by the loss scale"),
    Mutant("overflow-flag-not-reduced", "parallel/precision.py",
           '    wrapper.comm.all_reduce(flags, op="max")\n', "",
           ("tests/test_precision.py::test_a_nan_loss_on_one_rank_is_caught_everywhere_and_named",),
           "one rank's overflow skips the step on that rank only"),
    Mutant("expert-grads-not-scaled", "parallel/flat_params.py",
           'return (1.0 / self.world_size, "sum") if self.expert else (1.0, "avg")',
           'return (1.0, "sum") if self.expert else (1.0, "avg")',
           ("tests/test_moe.py::test_expert_parallel_with_ddp_and_zero_matches_single_process",),
           "expert gradients summed over their replicas without the 1/world scale (DDP and ZeRO)"),
    Mutant("dense-grads-summed-not-averaged", "parallel/flat_params.py",
           'if self.expert else (1.0, "avg")', 'if self.expert else (1.0, "sum")',
           ("tests/test_data_parallel.py::test_gradients_and_weights_match_single_process[ring-2]",),
           "dense gradients summed over the data-parallel ranks instead of averaged"),
    Mutant("expert-norm-not-summed-over-ep", "parallel/data_parallel.py",
           "            norm_group = self.comms.ep if unit.expert else None",
           "            norm_group = None",
           ("tests/test_moe.py::test_expert_parallel_with_ddp_and_zero_matches_single_process",),
           "DDP's clip norm counts only this rank's expert slice"),
    Mutant("zero-dcp-last-shard-offset", "parallel/zero/reshard.py",
           "DTensor.from_local(t[:real],", "DTensor.from_local(t[u.S - real:],",
           ("tests/test_zero.py::test_resharded_resume_from_4_to_2_ranks_follows_one_process",),
           "the sharded optimizer state of a padded last shard is saved from the wrong offset"),
    Mutant("ddp-unused-bucket-not-launched", "parallel/grad_sync.py",
           "        if self.in_order:\n            self._launch_ready(force=True)\n",
           "        if self.in_order:\n            self._launch_ready()\n",
           ("tests/test_data_parallel.py::test_unused_parameter_flag_matches_single_process",),
           "with find_unused_parameters, buckets holding an unused parameter are never reduced"),
    Mutant("memory-storage-counted-per-view", "parallel/memory.py",
           "            if key in self.seen:\n                continue\n", "",
           ("tests/test_zero.py::test_model_state_bytes_follow_the_formula",),
           "measured model state counts a storage once per tensor viewing it"),
    Mutant("ddp-half-params-not-refreshed", "parallel/data_parallel.py",
           "            torch._foreach_copy_(params, [self.master_of[id(p)] for p in params])",
           "            pass",
           ("tests/test_precision.py::test_mixed_precision_step_matches_single_process[2-ddp-bf16-fp32]",),
           "DDP's half parameters are not refreshed from the float32 masters after a step"),
    # -- benchmarks ---------------------------------------------------------------------------
    Mutant("bench-summary-min-not-median", "trainer/bench/output.py",
           "    med = statistics.median(trial_s)", "    med = min(trial_s)",
           ("tests/test_bench_ddp.py::test_rows_summarise_their_trials",),
           "a benchmark row reports its fastest trial instead of the median"),
    # -- trainer, data, checkpoints -----------------------------------------------------------
    Mutant("sampler-position-not-restored", "trainer/data/sampler.py",
           "        self.epoch, self.position = epoch, position\n", "        self.epoch = epoch\n",
           ("tests/test_data.py::test_resume_matches_an_uninterrupted_run",),
           "the data sampler's position is not restored on resume"),
    Mutant("checkpoint-rename-before-all-ranks-wrote", "trainer/checkpoint.py",
           '        _atomic_save({"rng": rng_state(), "engine": state.local, **rank_state}, '
           'tmp / f"rank_{self.rank}.pt")\n        self._barrier()\n',
           '        _atomic_save({"rng": rng_state(), "engine": state.local, **rank_state}, '
           'tmp / f"rank_{self.rank}.pt")\n',
           ("tests/test_checkpoint.py::test_the_checkpoint_is_sealed_only_after_every_rank_wrote",),
           "rank 0 seals and renames the checkpoint before every rank has written"),
    Mutant("crashed-save-debris-not-cleared", "trainer/checkpoint.py",
           "            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save\n", "",
           ("tests/test_robustness.py::test_a_run_killed_while_saving_leaves_a_loadable_checkpoint",),
           "a save after a crash mid-save trips over the .tmp_step_<N> it left"),
    Mutant("rank-state-unpickled", "trainer/checkpoint.py",
           '            state = torch.load(rank_file, map_location="cpu", weights_only=True)',
           '            state = torch.load(rank_file, map_location="cpu", weights_only=not True)',
           ("tests/test_checkpoint.py::test_a_checkpoint_that_would_run_code_is_refused",),
           "a rank file is unpickled, so a doctored checkpoint runs code when resumed"),
    Mutant("sharded-state-unpickled", "trainer/checkpoint.py",
           "planner=_TensorsOnlyLoadPlanner())", "planner=DefaultLoadPlanner())",
           ("tests/test_checkpoint.py::test_sharded_state_that_would_run_code_is_refused",),
           "DCP's sharded state is read with its default planner, which unpickles non-tensor items"),
    Mutant("layout-not-checked", "trainer/checkpoint.py",
           "            if saved != now:\n", "            if False:\n",
           ("tests/test_trainer.py::test_zero3_resume_is_exact",),
           "a checkpoint of another parallelism is loaded (its sharded state does not fit)"),
    Mutant("ep-expert-optimizer-keys-not-per-slice-ddp", "parallel/data_parallel.py",
           '(f".ep{self.comms.ep.rank}" if unit.expert else "")', '""',
           ("tests/test_trainer.py::test_moe_resume_with_ep2_is_exact[ddp]",),
           "DDP's expert slices share optimizer-state keys, so a resume loads one slice's state everywhere"),
    Mutant("ep-expert-optimizer-keys-not-per-slice-zero", "parallel/zero/reshard.py",
           '(f".ep{comms.ep.rank}" if u.expert else "")', '""',
           ("tests/test_trainer.py::test_moe_resume_with_ep2_is_exact[zero3]",),
           "ZeRO's expert slices share optimizer-state keys, so a resume loads one slice's state everywhere"),
    Mutant("deepspeed-fp16-hysteresis-not-consecutive", "trainer/engines/deepspeed.py",
           '"consecutive_hysteresis": True', '"consecutive_hysteresis": False',
           ("tests/test_trainer.py::test_deepspeed_config_maps_stage_precision_and_loss_scaler",),
           "DeepSpeed's fp16 hysteresis is not refilled by a clean step, unlike ringtrain's"),
    Mutant("deepspeed-resume-skips-engine-state", "trainer/engines/deepspeed.py",
           "        sd, opt = decode(state.local[\"optimizer\"]), self.engine.optimizer\n",
           "        return\n",
           ("tests/test_trainer.py::test_deepspeed_resume_is_exact",),
           "engine=deepspeed resumes the weights but not DeepSpeed's optimizer state"),
    Mutant("accelerate-resume-skips-engine-state", "trainer/engines/accelerate.py",
           "    def sharded_template(self) -> dict:\n        return self._optimizer_state()\n",
           "    def sharded_template(self) -> dict:\n        return {}\n",
           ("tests/test_trainer.py::test_accelerate_resume_is_exact",),
           "engine=accelerate resumes the weights but not the optimizer state"),
    # -- topology-aware collectives --------------------------------------------------------
    Mutant("hier-skips-the-inter-node-level", "parallel/collectives/hier.py",
           '        lookup("all_reduce", name)(lv.inter, piece, between_op, tuning)\n', "",
           ("tests/test_hier.py::test_hier_exact_on_every_layout_dtype_and_size[4]",),
           "hier all-reduce leaves out the all-reduce between nodes (each node sums only its own ranks)"),
    Mutant("hier-pieces-in-rank-order", "parallel/collectives/hier.py",
           "        return [r for local in range(self.per_node) for r in self.layout.peers(local)]",
           "        return list(range(self.layout.world_size))",
           ("tests/test_hier.py::test_hier_exact_on_every_layout_dtype_and_size[4]",),
           "hier reduce-scatter / all-gather do not permute pieces to local-index order"),
    Mutant("inter-node-bytes-not-counted", "parallel/collectives/transport.py",
           "            if self._remote is not None and self._remote[dst]:",
           "            if self._remote is not None and self._remote[dst] and False:",
           ("tests/test_hier.py::test_inter_node_bytes_hier_against_ring",),
           "bytes to ranks on other nodes are not counted as inter-node"),
    Mutant("node-discovery-ignores-torchrun", "parallel/collectives/nodes.py",
           '    for var, prefix in ((NODE_ENV, "node"), ("GROUP_RANK", "torchrun"), ("SLURM_NODEID", "slurm")):',
           '    for var, prefix in ((NODE_ENV, "node"), ("SLURM_NODEID", "slurm")):',
           ("tests/test_hier.py::test_node_discovery",),
           "node identity ignores torchrun's GROUP_RANK (every agent's ranks look like one host)"),
    Mutant("auto-ignores-its-table", "parallel/collectives/communicator.py",
           "                chosen = self.table.choose(op, DTYPE_NAMES.get(dtype, \"float32\"), nbytes, allowed)",
           "                chosen = None",
           ("tests/test_hier.py::test_auto_runs_what_the_tuning_table_says",
            "tests/test_hier.py::test_training_with_auto_takes_each_buckets_algorithm_from_the_tuning_file"),
           "auto runs the fallback whatever the tuning table says"),
    Mutant("tuning-file-for-any-layout", "parallel/collectives/autotune.py",
           "        return None if same else f\"it was measured for {mine}, this job is {job}\"",
           "        return None",
           ("tests/test_hier.py::test_tuning_file_damaged_or_for_another_layout",
            "tests/test_hier.py::test_training_with_a_tuning_file_for_another_layout_calibrates"),
           "a tuning file measured for another layout is used anyway"),
    Mutant("costmodel-links-not-shared", "parallel/bench/costmodel/features.py",
           "            self.v[3] += math.ceil(k / nics) * nbytes",
           "            self.v[3] += nbytes",
           ("tests/test_costmodel.py",),
           "the cost model lets flows that share a node's link each have it to themselves"),
    Mutant("trace-hides-blocking-collectives", "trainer/trace.py",
           "    computing = subtract(compute, blocked)",
           "    computing = list(compute)",
           ("tests/test_trace.py::test_exposed_share_on_hand_made_intervals",),
           "a blocking collective inside a compute span is not counted as exposed communication"),
    Mutant("emulator-keeps-its-namespaces", "launch/emulate_cluster.sh",
           '        ip netns del "${created[t]}" 2>/dev/null ||\n', '        true ||\n',
           ("tests/test_emulated_cluster.py::test_a_failing_worker_fails_the_run_and_cleans_up",),
           "the emulated cluster leaves its namespaces behind"),
    Mutant("emulator-shapes-one-direction", "launch/emulate_cluster.sh",
           '    shape "$switch" "v$i"\n', "",
           ("tests/test_emulated_cluster.py::test_two_nodes_of_two_ranks",),
           "the emulated cluster shapes only the node -> switch direction of each link"),
    Mutant("diag-attention-sees-across-blocks", "models/attention/transnormer.py",
           "        blk = min(self.block_size, T)\n", "        blk = T\n",
           ("tests/test_attention.py::test_diag_attention_equals_the_naive_masked_form",),
           "TransNormer's DiagAttention attends over the whole sequence instead of its block"),
    # -- context parallelism: mesh, trainer, activation checkpointing --------------------------
    Mutant("cp-group-not-consecutive", "parallel/mesh.py",
           'return [grid[i, j].tolist() for i in range(d["dp_outer"]) for j in range(d["ep"])]',
           'return [grid[i, j].tolist()[::-1] for i in range(d["dp_outer"]) for j in range(d["ep"])]',
           ("tests/test_mesh.py::test_cp_groups_are_consecutive_ranks_and_share_the_data",),
           "the cp groups' instances listed out of rank order"),
    Mutant("cp-ranks-read-different-data", "parallel/mesh.py",
           "        return self.rank // self.shape.cp\n", "        return self.rank % self.shape.cp\n",
           ("tests/test_mesh.py::test_cp_groups_are_consecutive_ranks_and_share_the_data",),
           "the ranks of one cp group given different data-parallel ranks"),
    Mutant("cp-metrics-cumulative", "trainer/loop.py",
           '{"cp_bytes_per_step": (now[5] - before[5]) / self._steps,',
           '{"cp_bytes_per_step": now[5] / self._steps,',
           ("tests/test_context_parallel.py::test_cp_metrics_and_log_line",),
           "cp bytes per step counted from the start of the run"),
    Mutant("activation-checkpointing-does-nothing", "parallel/activation_checkpoint.py",
           "block.forward = functools.partial(_recomputed, block.forward)", "block.forward = block.forward",
           ("tests/test_context_parallel.py::test_checkpointed_blocks_and_bitwise_gradients",),
           "activation checkpointing leaves the blocks as they were"),
    Mutant("selective-checkpointing-odd-blocks", "parallel/activation_checkpoint.py",
           "list(range(0, n_blocks, 2))", "list(range(1, n_blocks, 2))",
           ("tests/test_context_parallel.py::test_checkpointed_blocks_and_bitwise_gradients",),
           "selective checkpointing picks the odd blocks, not the documented even ones"),
    Mutant("cp-loss-not-local", "models/transformer.py",
           "            targets = self.cp.local(targets) if targets is not None else None\n",
           "            targets = self.cp.local(targets.roll(1, dims=1)) if targets is not None else None\n",
           ("tests/test_context_parallel.py::test_cp_follows_one_rank[cp2-one]",),
           "each cp rank scores its tokens against shifted targets"),
    # -- context parallelism: ring attention ---------------------------------------------------
    Mutant("ring-attention-merge-by-max", "parallel/ring_attention.py",
           "    new = torch.logaddexp(lse, part_lse)\n", "    new = torch.maximum(lse, part_lse)\n",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K4]",),
           "partial attention outputs merged by the larger lse instead of the log-sum-exp"),
    Mutant("ring-attention-skips-a-needed-pair", "parallel/ring_attention.py",
           "    return [(late, both, False)]\n", "    return [(late, early, False)]\n",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K3+K1]",),
           "against a later rank's K/V the late query chunk skips the second key chunk"),
    Mutant("ring-attention-diagonal-not-causal", "parallel/ring_attention.py",
           "(early, early, True)", "(early, early, False)",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K2x2]",),
           "the early chunk's own block attends to its future keys"),
    Mutant("ring-attention-dkv-sent-the-wrong-way", "parallel/ring_attention.py",
           "grads = tp.post([(dkv, (c + 1) % K)], [(dkv_spare, (c - 1) % K)])",
           "grads = tp.post([(dkv, (c - 1) % K)], [(dkv_spare, (c + 1) % K)])",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K4]",),
           "the dK/dV accumulator travels against the K/V, so it ends on the wrong rank"),
    Mutant("ring-attention-keeps-the-sent-dkv", "parallel/ring_attention.py",
           "            dkv = dkv_spare\n", "            dkv = dkv\n",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K2x2]",),
           "a rank keeps the accumulator it sent on (its neighbour's dK/dV), not the one that came back"),
    Mutant("ring-attention-waits-not-counted", "parallel/ring_attention.py",
           "    tp.stats.wait_s += time.perf_counter() - t0\n", "",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K2x2]",),
           "seconds blocked in ring attention's waits are not added to wait_s"),
    Mutant("ring-attention-backward-bytes-formula", "parallel/ring_attention.py",
           "((K - 1) * n * b + K * n * b_acc)", "((K - 1) * n * b + (K - 1) * n * b_acc)",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K4]",),
           "cp_attention_bytes counts K-1 hops of the ring's dK/dV accumulator, the ring makes K"),
    Mutant("allgather-attention-chunks-in-rank-order", "parallel/ring_attention.py",
           "halves[:, :, :, :, 1].flip(0)", "halves[:, :, :, :, 1]",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K3+K1]",),
           "all-gathered late chunks put in rank order instead of global order"),
    Mutant("allgather-attention-dkv-to-the-wrong-owner", "parallel/ring_attention.py",
           "chunks[K:].flip(0)", "chunks[K:]",
           ("tests/test_ring_attention.py::test_float64_matches_single_process[K4]",),
           "the reduce-scatter hands late chunks' dK/dV to the wrong ranks"),
    Mutant("attention-fallback-backward-drops-delta", "parallel/ring_attention.py",
           "- delta) * scale", ") * scale",
           ("tests/test_ring_attention.py::test_blocks_merged_by_lse_give_exact_attention_and_gradients[math-fallback]",),
           "the non-CPU math backward leaves out rowsum(dO * O)"),
    # -- context parallelism: state passing of the linear-time kinds --------------------------
    Mutant("cp-prefix-includes-own-state", "parallel/context_parallel.py",
           "mask = (torch.arange(comm.world_size, device=x.device) < c).to(x.dtype)",
           "mask = (torch.arange(comm.world_size, device=x.device) <= c).to(x.dtype)",
           ("tests/test_cp_attention.py::test_layer_equals_one_process[linear-layer-2]",),
           "the earlier ranks' state sum includes the rank's own state"),
    Mutant("cp-state-grads-not-returned", "parallel/context_parallel.py",
           "        return mine, None, None\n", "        return torch.zeros_like(mine), None, None\n",
           ("tests/test_cp_attention.py::test_layer_equals_one_process[transnormer-layer-2]",),
           "the state gradients of later ranks never come back to the rank that made the state"),
    Mutant("performer-prefix-max-ignored", "models/attention/performer.py",
           "start = ends[cp.rank - 1] if cp.rank > 0 else None", "start = None",
           ("tests/test_cp_attention.py::test_layer_equals_one_process[performer-layer-3]",),
           "Performer's running max restarts on every cp rank"),
    Mutant("performer-earlier-states-not-rescaled", "models/attention/state_passing.py",
           "weights = torch.exp((log_scales - (top if top is not None else log_scales[0])).clamp(max=0))",
           "weights = torch.ones_like(log_scales)",
           ("tests/test_cp_attention.py::test_layer_equals_one_process[performer-layer-3]",),
           "earlier ranks' Performer states summed at their own scales"),
    Mutant("gau-earlier-ranks-dropped", "models/attention/gau.py",
           "earlier_states = earlier_states + initial.to(dtype)[:, None]", "earlier_states = earlier_states",
           ("tests/test_cp_attention.py::test_layer_equals_one_process[gau-layer-2]",),
           "GAU's linear part forgets the earlier ranks' chunks"),
    Mutant("rope-local-positions-under-cp", "models/attention/heads.py",
           "return None if self.cp is None else self.cp.positions(local_len * self.cp.size, device)",
           "return None",
           ("tests/test_cp_attention.py::test_layer_equals_one_process[transnormer-diag-2]",),
           "RoPE rotates a cp rank's tokens by their local positions"),
    Mutant("performer-rescale-overflows", "models/attention/state_passing.py",
           "(log_scales - (top if top is not None else log_scales[0])).clamp(max=0)",
           "(log_scales - (top if top is not None else log_scales[0]))",
           ("tests/test_cp_attention.py::test_performer_ranks_with_far_apart_key_maxima_stay_finite",),
           "later ranks' unused rescaling weights overflow to inf, and the mask makes them nan"),
]


def _tree_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def _copy_tree(root: Path, dest: Path) -> None:
    for rel in _tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def _pytest(tree: Path, tests: tuple[str, ...]) -> tuple[int | None, str, float]:
    """(exit code or None on the time limit, the output's tail, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"")[-2000:].decode(errors="replace") if isinstance(e.stdout, bytes) else "", \
            time.monotonic() - t0
    return r.returncode, (r.stdout + r.stderr)[-3000:], time.monotonic() - t0


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1][:110]
    return ""


def _apply(tree: Path, m: Mutant) -> str:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.name}: the text to replace occurs {count} times in {m.file} "
                         "(the code moved: update the mutant)")
    path.write_text(text.replace(m.old, m.new))
    return text


def _run_mutant(tree: Path, m: Mutant) -> tuple[Mutant, str, float, str, str]:
    original = _apply(tree, m)
    try:
        code, out, secs = _pytest(tree, m.tests)
    finally:
        (tree / m.file).write_text(original)
    status = "killed" if code == 1 else "SURVIVED" if code == 0 else "ERROR"
    detail = _first_failure(out) if code == 1 else ("time limit" if code is None else f"exit {code}")
    return m, status, secs, detail, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the targets")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once, each in its own copy (default 2)")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if len(by_name) != len(MUTANTS):
        raise SystemExit("two mutants share a name")
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown mutant(s) {unknown}; known: {sorted(by_name)}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    chosen = [by_name[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:42s} {m.file:38s} {m.breaks}\n{'':42s} -> {' '.join(m.tests)}")
        return 0
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ringtrain-mutants-") as tmp:
        trees = [Path(tmp) / f"tree{j}" for j in range(min(args.jobs, len(chosen)))]
        for tree in trees:
            _copy_tree(ROOT, tree)
        for m in chosen:  # every mutant must still apply before anything runs
            (trees[0] / m.file).write_text(_apply(trees[0], m))
        if not args.no_baseline:
            targets = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, out, secs = _pytest(trees[0], targets)
            print(f"baseline: {len(targets)} target(s), exit {code}, {secs:.0f} s", flush=True)
            if code != 0:
                print(out)
                print("the targets fail without any mutant: fix that first")
                return 2
        results = []
        # each worker thread owns one tree copy and takes mutants in list order
        queue = list(chosen)
        lock = threading.Lock()

        def worker(tree: Path) -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    m = queue.pop(0)
                result = _run_mutant(tree, m)
                with lock:
                    results.append(result)
                    _, status, secs, detail, out = result
                    print(f"{status:8s} {m.name:42s} {secs:5.0f} s  {detail}", flush=True)
                    if status == "ERROR":
                        print(out[-1500:])

        threads = [threading.Thread(target=worker, args=(tree,)) for tree in trees]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    killed = sum(s == "killed" for _, s, _, _, _ in results)
    print(f"{killed} of {len(results)} mutants killed in {time.monotonic() - t_start:.0f} s")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
