"""KV block manager tiers: host memory and disk under an engine's paged cache (see tiered.py)."""
from turbine.kvbm.pools import TierPool
from turbine.kvbm.tiered import DISK, HOST, TierCopy, TieredCache, TierSource

__all__ = ["DISK", "HOST", "TierCopy", "TierPool", "TierSource", "TieredCache"]
