"""Tensor parallelism of the built-in engine: one model over N ranks (README: the executor).

``TPGroup`` (group.py) is one rank's collectives; ``TPExecutor`` (executor.py) is rank 0's side:
it starts the other ranks (rank.py), hands them each step and watches them. Importing this
package imports torch.
"""
from __future__ import annotations

from turbine.engine.parallel.executor import RankFailure, TPExecutor
from turbine.engine.parallel.group import TPGroup

__all__ = ["RankFailure", "TPExecutor", "TPGroup"]
