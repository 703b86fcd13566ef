"""What `nencache serve` and `nencache stats` do (the CLI only parses their arguments)."""

from __future__ import annotations

import json
import os

from nencache.config_loader import LoadedConfig


def serve_command(loaded: LoadedConfig, *, config_file: str | None, host: str | None, port: int | None,
                  admin_port: int | None) -> int:
    """Run a server until SIGTERM; with no config file, on the embedded defaults (and say so)."""
    from nencache.server.server import serve
    from nencache.server.settings import ServerSettings, embedded_defaults

    config = loaded.config
    if not (config_file or os.environ.get("NENCACHE_CONFIG_FILE") or os.environ.get("LMCACHE_CONFIG_FILE")):
        config, line = embedded_defaults(loaded)
        print(f"nencache serve: {line}", flush=True)
    settings = ServerSettings.from_config(config, host=host, port=port, admin_port=admin_port)
    return serve(settings, announce=lambda text: print(text, flush=True))


def stats_command(loaded: LoadedConfig, *, url: str | None, as_json: bool) -> int:
    """Print a running server's admin /stats as a table (or JSON)."""
    from nencache.server.admin import fetch_stats, format_stats

    data = fetch_stats(url or f"http://127.0.0.1:{loaded.config.server.admin_port or 5871}")
    print(json.dumps(data, indent=2) if as_json else format_stats(data))
    return 0
