"""KV-aware routing: block hashing, the prefix indexer, load tracking and selection policies."""
