"""ovml: train an open-vocabulary multi-label image classifier from LLM-written text alone.

The repository root is installed as this package (pyproject's `package-dir`), so the design card's
top-level folders are imported as `ovml.cli`, `ovml.pipeline`, `ovml.stages` and `ovml.prompts`.
"""
