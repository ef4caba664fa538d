"""One module per command; each has one entry function taking a typed config (a dataclass).

The pipeline stages (generate_text, embed_text, train_adapter, embed_images, evaluate) read and write
artifacts in a run directory and record themselves in its manifest. Three modules here are not stages but sit
beside them because a newcomer looks for every command in one place: `predict` and `search` read the adapter
and write no artifact (search keeps rebuildable FAISS indexes in cache/), and `run` is the orchestrator that
calls the stages in order (the one module that imports others).
"""
