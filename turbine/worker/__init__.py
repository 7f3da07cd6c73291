"""Workers: an engine wrapped as a runtime component (generate endpoint, KV events, model card)."""
