"""`torchrun --nproc_per_node=N -m parallel.bench ops=[...] algorithms=[...] ...`"""

import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig

from ..process_group import abort_process
from .config import BenchConfig, make_plan
from .run import run_bench

ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


@hydra.main(version_base="1.3", config_path="../../configs", config_name="bench")
def main(cfg) -> None:
    try:
        make_plan(cfg)
    except ValueError as e:  # a bad value: one line naming the key, no traceback
        print(f"parallel.bench: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    run_bench(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
    abort_process(None, exit_code=0)  # no interpreter teardown: see trainer/train.py
