"""Adapters for inference engines: `hf` (transformers), `vllm/` (a KV connector), `sglang/` (a HiCache
storage backend). The only layer that imports engine code; each engine is an optional extra, imported by
the functions or the one module that need it (`vllm.connector`, `sglang.storage`), never on import of
this package.
"""
