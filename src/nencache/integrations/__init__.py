"""Adapters for inference engines (transformers, vLLM, SGLang). Each imports its engine lazily."""
