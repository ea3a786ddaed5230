"""ringtrain's collective library: ring, recursive halving-doubling, tree and native
algorithms behind one registry. See api.py for the ops and docs/collectives.md for the matrix."""

from .api import all_gather, all_reduce, all_to_all, broadcast, exchange_split_sizes, reduce_scatter
from .autotune import TuningTable, calibrate
from .communicator import CollectiveSpan, Communicator, Handle
from .reduce_ops import REDUCE_OPS, split_bounds, split_sizes
from .nodes import NodeLayout, discover_layout
from .registry import ALGORITHMS, AUTO, OPS, Tuning, available
from .timeouts import CollectiveTimeout
from .transport import CommStats, Transport

__all__ = [
    "AUTO", "NodeLayout", "TuningTable", "calibrate", "discover_layout", "ALGORITHMS", "OPS", "REDUCE_OPS", "CollectiveSpan", "CollectiveTimeout", "CommStats", "Communicator", "Handle", "Transport",
    "Tuning", "all_gather", "all_reduce", "all_to_all", "available", "broadcast", "exchange_split_sizes",
    "reduce_scatter", "split_bounds", "split_sizes",
]
