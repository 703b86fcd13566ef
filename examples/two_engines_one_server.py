"""Two engines sharing one `nencache serve`: the second engine's prompt comes from the first one's KV.

    python examples/two_engines_one_server.py [--tiny]

Starts `nencache serve` on a free port (as you would run it once per machine or cluster), then two
engine processes with `remote_url: nencache://...`. On one machine the engines read chunks straight
out of the server's memory pool (shared memory); from other machines, over its socket.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from engine import run_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a two-layer random model (a quick check)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "server.yaml"
        config.write_text("cpu_size: 512MiB\nserver_admin_port: null\n")
        server = subprocess.Popen([sys.executable, "-m", "nencache.cli", "serve", "--port", "0", "--config",
                                   str(config)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            listening = re.search(r"listening on (nencache://\S+:\d+)", server.stdout.readline())
            if listening is None:
                raise SystemExit("nencache serve did not start")
            url = listening.group(1)
            print(f"server: {url}")
            for name in ("engine 1", "engine 2"):
                result = run_engine({"cpu_size": "256MiB", "remote_url": url, "remote_timeout": 5.0}, args.tiny)
                print(f"{name}: {result['cached']} of {result['prompt']} prompt tokens from the cache, "
                      f"TTFT {result['ttft_ms']} ms, answer {result['answer']}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
