"""ringtrain.parallel: collectives, data parallelism and the collective benchmark.

Depends on torch only; never imports trainer."""
