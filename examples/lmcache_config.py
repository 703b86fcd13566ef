"""LMCache's config file used unchanged: `LMCACHE_CONFIG_FILE` (or `--config`) points at it as before.

    LMCACHE_CONFIG_FILE=examples/lmcache_config.yaml python examples/lmcache_config.py

prints the effective NenCache config with where each value came from (the LMCache key it was read
from), then stores and finds one prompt's KV with it. `nencache config` prints the same table.
`LMCACHE_*` variables override the file, as with LMCache (e.g. `LMCACHE_LOCAL_DISK=file:///data/kv/`).
"""

from __future__ import annotations

import argparse
import logging

import torch

from nencache import KVCache, KVLayout
from nencache.config_loader import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: LMCACHE_CONFIG_FILE / NENCACHE_CONFIG_FILE)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_config(args.config)  # LMCache's keys and LMCACHE_* variables are understood as they are
    config = loaded.config
    values = config.as_dict()  # by flat key, the names the file and the variables use
    for key, source in sorted(loaded.sources.items()):
        print(f"{key:<20} {values[key]!s:<36} {source}")
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    tokens = list(range(1000, 1000 + 3 * config.chunk_size + 10))
    with KVCache(config, layout, model_id="examples-lmcache-config") as cache:
        kv = torch.randn(layout.shape(len(tokens))).to(layout.dtype)
        cache.store(tokens, kv)
        found = cache.lookup(tokens)
        same = torch.equal(cache.retrieve(tokens[:found]).view(torch.int16), kv[:, :, :found].view(torch.int16))
        print(f"stored {len(tokens)} tokens; lookup finds {found}; retrieved KV identical: {same}")


if __name__ == "__main__":
    main()
