"""OpenAI-compatible HTTP frontend: validation, preprocessing, streaming, metrics."""
