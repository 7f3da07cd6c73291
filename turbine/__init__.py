"""Turbine: serve LLMs across a fleet of inference engines as one OpenAI-compatible service."""

__version__ = "0.1.0"
