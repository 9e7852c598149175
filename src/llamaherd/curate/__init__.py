"""`herd curate`: web-text curation the RefinedWeb way (Penedo et al. 2023, "The RefinedWeb Dataset for Falcon LLM").

Stages are functions over `Document`s (document.py), one module per family of rules; a YAML recipe chooses and
parameterizes them; executors run them over shards on a local process pool or on Ray.
"""
