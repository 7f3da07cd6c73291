"""Contracts shared between Turbine's subsystems: wire messages (msgspec Structs, defaults on new
fields) and the block hashing every worker and router computes alike (``block_hashing``)."""
