"""Prefect flows, one per file: quantize (the pipeline) and demo (the embedded default)."""
