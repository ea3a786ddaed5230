"""Training data: config, cached token files, and data-parallel batch sampling.

Independent of process groups: callers pass plain dp_rank / dp_size ints.
"""

from .config import DATA_KINDS, DataConfig, validate_data_config
from .corpus import TokenData, load_tokens
from .sampler import ShardedBatches, check_split_sizes, eval_batch_count, eval_batches

__all__ = ["DATA_KINDS", "DataConfig", "validate_data_config", "TokenData", "load_tokens",
           "ShardedBatches", "check_split_sizes", "eval_batch_count", "eval_batches"]
