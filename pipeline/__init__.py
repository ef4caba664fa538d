"""Machinery the stages share: config, run directory, atomic I/O, CLIP, LLMs, data, models, metrics."""
