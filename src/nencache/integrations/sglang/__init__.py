"""SGLang integration: NenCache as a HiCache storage backend (SGLang's L3, below GPU and host memory).

Launch SGLang with::

    python -m sglang.launch_server --model-path MODEL --page-size 64 --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name":"nencache",
            "module_path":"nencache.integrations.sglang.storage","class_name":"NenCacheHiCacheStorage",
            "interface_v1":1}'

HiCache names each page of `page_size` tokens by a hash of its prefix and moves pages between its
host pool and the storage backend by those names. The package is laid out by what imports what:

- `pages`: `HostPageLayout`, a host pool's declared page geometry and the page <-> chunk conversion (torch);
- `backend`: `HiCacheBackend`, HiCache's storage calls over one host pool and a `PageStore` (torch);
- `metrics`, `settings`: the transfer log behind SGLang's storage metrics, and NenCache settings in
  SGLang's extra config (plain Python);
- `storage`: `NenCacheHiCacheStorage`, the class SGLang loads; the only module that imports SGLang.
"""
