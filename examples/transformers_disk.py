"""transformers with a disk tier: run it twice; the second run reads the document's KV from disk.

    python examples/transformers_disk.py --disk /var/tmp/nencache-kv      # first run: computes, stores
    python examples/transformers_disk.py --disk /var/tmp/nencache-kv      # second run: prefix from disk

The CPU pool is small on purpose here: what does not fit stays on disk, and a new process (after a
restart, or another engine on the same machine) finds it there.
"""

from __future__ import annotations

import argparse

from engine import answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", required=True, help="directory of the disk tier")
    parser.add_argument("--tiny", action="store_true", help="a two-layer random model (a quick check)")
    args = parser.parse_args()
    print(answer({"cpu_size": "256MiB", "disk_path": args.disk, "disk_size": "4GiB"}, args.tiny))


if __name__ == "__main__":
    main()
