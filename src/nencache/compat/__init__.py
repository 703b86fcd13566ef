"""LMCache compatibility, at the config edge only: LMCache's config keys and `LMCACHE_*` variables
(`keys`, `env`), its `remote_url` schemes (`urls`) and its `remote_serde` names (`serde`), each turned
into NenCache's own flat keys, URLs and codec names. Nothing below the config loader imports this.
"""
