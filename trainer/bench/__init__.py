"""The training benchmarks, one module each, all run the same way:

    torchrun --standalone --nproc_per_node=2 -m trainer.bench.ddp        # ringtrain DDP vs torch DDP
    python -m trainer.bench.zero                                         # ddp / zero1-3: native, DeepSpeed, Accelerate
    torchrun --standalone --nproc_per_node=2 -m trainer.bench.precision  # fp32 / bf16 / fp16 under DDP / ZeRO
    torchrun --standalone --nproc_per_node=2 -m trainer.bench.moe        # MoE layer vs DeepSpeed's, MoE vs dense
    python -m trainer.bench.attention                                    # every attention kind against length

One set of flags (flags.py: the model shape, --warmup / --iters / --trials / --seed / --out),
checked before any process group; one timer (parallel/bench/timing.py: interleaved trials,
mean over ranks, device synchronised); one output convention (output.py: table.txt,
<name>.csv, <name>.json, <name>.png in --out); training rows through the engines' real
`train_step` (common.py). The collective benchmark is `python -m parallel.bench`.
Commands and measured tables: docs/benchmarks.md.
"""
