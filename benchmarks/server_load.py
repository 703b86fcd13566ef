"""NenCache server under load and under attack, before and after a change, side by side.

- Load: `nencache serve` (64 MiB pool of 1 MiB pages, 32 MiB disk tier) in a child process; N client
  processes (default 16) for S seconds (default 45), each looping over: GET (45%), PUT (45%) or EXISTS
  (10%) of a run of 1-8 keys out of 300 (blobs of 64 KiB-1 MiB, ~180 MB in all: more than pool and disk
  hold), through `ServerTier` over the socket (`remote_shared_memory` off; `--client-timeout`, default
  `remote_timeout`'s 0.25 s, what an engine's `KVCache` uses). Reported:
  ops/s and p50/p99 per op over the calls that reached the server, GET hit rate (chunks found / chunks
  asked of the server), client errors (calls that failed: timeouts, refusals), the calls a client
  skipped because a failed call had marked the server down (answered as misses at once, not timed),
  BUSY replies, disk writes given up, and the server's peak RSS against its pool.
- Attacks: one good client on 127.0.0.1 GETs 8 of its chunks (512 KiB each) in a loop and records
  each call's time; another process attacks from 127.0.0.2 for a phase: slowloris (headers a byte
  at a time), slow PUT bodies, GETs whose replies are never read, idle connections past the whole
  connection limit. Each attack phase follows an idle phase on the same server; the table gives the
  good client's GET p99 under attack over its p99 in the idle phase before (median and range over
  reps), and its misses and errors.
- `--baseline REF`: the same runs against the code of git REF (its `src/` extracted to a temporary
  directory and put first on the server's PYTHONPATH), interleaved with the working tree's rep by rep.
  The clients are the working tree's in both.

    python benchmarks/server_load.py [--seconds 45] [--clients 16] [--client-timeout 0.25] [--reps 2]
                                     [--attack-seconds 5] [--attack-reps 3] [--baseline REF]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _results import command_line, median, table, write_section  # noqa: E402

from nencache.config import CacheConfig  # noqa: E402
from nencache.format import ChunkHeader  # noqa: E402
from nencache.tiers.remote import ServerTier  # noqa: E402
from nencache.net.protocol import Frame, Op, pack_keyed_meta  # noqa: E402
from tests.server.util import attacker_socket  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
KEYS = 300
LOAD_CONFIG = {"cpu_size": "64MiB", "disk_size": "32MiB", "server_max_chunk_bytes": "1MiB",
               "server_max_request_bytes": "8MiB"}
ATTACK_CONFIG = {"cpu_size": "64MiB", "server_max_chunk_bytes": "1MiB", "server_max_request_bytes": "8MiB",
                 "server_io_timeout": 2.0, "server_max_connections": 200}
NEW_KEYS = {"server_idle_timeout": 5.0, "server_max_client_connections": 64}


# --- a server of one code version ------------------------------------------------------------------
class Server:
    def __init__(self, directory: Path, config: dict[str, Any], src: Path | None) -> None:
        path = directory / "server.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
        if src is not None:
            env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "nencache.cli", "serve", "--port", "0", "--admin-port",
                                      "0", "--config", str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = re.search(r"listening on (nencache://\S+:(\d+)), admin http://\S+:(\d+)", line)
            if match:
                self.url, self.port, self.admin = match.group(1), int(match.group(2)), int(match.group(3))
                break
        else:
            raise RuntimeError("the server did not start")
        self.rss_peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        proc = psutil.Process(self.proc.pid)
        while not self._stop.wait(0.25):
            try:
                self.rss_peak = max(self.rss_peak, proc.memory_info().rss)
            except psutil.Error:
                return

    def stats(self) -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats", timeout=10).read())

    def close(self) -> None:
        self._stop.set()
        self.proc.kill()
        self.proc.wait(30)


def blob(index: int, size: int) -> bytes:
    payload = random.Random(index).randbytes(size)
    return ChunkHeader(0, 3, 1, 1, 1, 1, size, zlib.crc32(payload), key(index)).pack() + payload


def key(index: int) -> bytes:
    return index.to_bytes(16, "little")


# --- load --------------------------------------------------------------------------------------------
def load_client(url: str, seed: int, seconds: float, timeout: float, out: Any) -> None:
    rng = random.Random(seed)
    blobs = {i: blob(i, random.Random(-i).randrange(64 << 10, MIB - 64)) for i in range(KEYS)}  # one blob a key
    tier = ServerTier(url, "load", timeout=timeout, shared_memory=False)
    lat: dict[str, list[float]] = {"get": [], "put": [], "exists": []}
    asked = found = wrong = down = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = rng.randrange(KEYS)
        ids = [(start + i) % KEYS for i in range(rng.randrange(1, 9))]
        keys = [key(i) for i in ids]
        roll = rng.random()
        if not tier.is_up:  # after a failed call: the client answers misses at once until the server is back
            down += 1
            time.sleep(0.01)
            continue
        began = time.perf_counter()
        if roll < 0.45:
            got = tier.get(keys)
            lat["get"].append(time.perf_counter() - began)
            asked += len(keys)
            found += sum(g is not None for g in got)
            wrong += sum(g is not None and bytes(g) != blobs[i] for i, g in zip(ids, got))
        elif roll < 0.9:
            tier.put([(key(i), blobs[i]) for i in ids])
            lat["put"].append(time.perf_counter() - began)
        else:
            tier.contains_prefix(keys)
            lat["exists"].append(time.perf_counter() - began)
    out.put({"lat": lat, "asked": asked, "found": found, "wrong": wrong, "errors": tier.stats().errors,
             "down": down})
    tier.close()


def run_load(src: Path | None, clients: int, seconds: float, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        server = Server(Path(work), LOAD_CONFIG | {"disk_path": str(Path(work) / "disk")}, src)
        try:
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            procs = [ctx.Process(target=load_client, args=(server.url, seed, seconds, timeout, out))
                     for seed in range(clients)]
            for p in procs:
                p.start()
            results = [out.get(timeout=seconds + 300) for _ in procs]
            for p in procs:
                p.join(60)
            stats = server.stats()
            lat = {op: sorted(x for r in results for x in r["lat"][op]) for op in ("get", "put", "exists")}
            ops = sum(len(v) for v in lat.values())
            writer = stats.get("disk_writer", {})
            return {
                "ops_s": ops / seconds, "lat": {op: (pct(v, 0.5), pct(v, 0.99)) for op, v in lat.items()},
                "hit": sum(r["found"] for r in results) / max(1, sum(r["asked"] for r in results)),
                "wrong": sum(r["wrong"] for r in results), "errors": sum(r["errors"] for r in results),
                "down": sum(r["down"] for r in results),
                "busy": stats["server"]["errors"].get("busy", 0), "disk_dropped": writer.get("dropped", 0),
                "rss": server.rss_peak, "pool": stats["pool"]["capacity_bytes"],
            }
        finally:
            server.close()


def pct(values: list[float], q: float) -> float:
    return values[int(q * (len(values) - 1))] if values else float("nan")


# --- attacks -------------------------------------------------------------------------------------------
def attack(kind: str, port: int, seconds: float, ready: Any) -> None:
    """Run one attack from 127.0.0.2 for `seconds` (in its own process): 60 threads of it, reconnecting when cut.
    `ready` is set once the process has started them (its start-up is not part of the attack)."""
    stop = time.monotonic() + seconds
    good_keys = [key(10_000 + i) for i in range(8)]

    def one() -> None:
        while time.monotonic() < stop:
            sock = None
            try:
                if kind == "idle connections":
                    held = []
                    while time.monotonic() < stop and len(held) < 20:
                        held.append(attacker_socket(port))
                    while time.monotonic() < stop:
                        time.sleep(0.1)
                    for s in held:
                        s.close()
                    return
                sock = attacker_socket(port, rcvbuf=4096 if kind == "non-reading GET" else None)
                if kind == "slowloris":
                    frame = Frame(Op.PING, 1).pack()
                    for i in range(len(frame)):
                        sock.send(frame[i : i + 1])
                        time.sleep(0.5)
                elif kind == "slow PUT":
                    meta = pack_keyed_meta(b"attack", [key(i) for i in range(8)], [MIB - 64] * 8)
                    sock.sendall(Frame(Op.PUT, 1, 8, len(meta), 8 * (MIB - 64)).pack() + meta + b"\0")
                    while time.monotonic() < stop:
                        sock.send(b"\0")
                        time.sleep(0.5)
                else:  # non-reading GET
                    meta = pack_keyed_meta(b"good", good_keys)
                    sock.sendall(b"".join(Frame(Op.GET, i, 8, len(meta)).pack() + meta for i in range(4)))
                    while time.monotonic() < stop:
                        sock.send(Frame(Op.PING, 9).pack())
                        time.sleep(0.5)
            except OSError:
                time.sleep(0.05)
            finally:
                if sock is not None:
                    sock.close()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(60)]
    for t in threads:
        t.start()
    ready.set()
    for t in threads:
        t.join(seconds + 30)


def good_phase(tier: ServerTier, keys: list[bytes], blobs: list[bytes], seconds: float,
               fresh: bool) -> dict[str, Any]:
    """The good client's GETs for `seconds`; with `fresh`, each on a new client (connect, AUTH, GET)."""
    lat: list[float] = []
    misses = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        client = ServerTier(tier.url, "good", timeout=3.0, shared_memory=False) if fresh else tier
        before = client.stats().errors
        got = client.get(keys)
        lat.append(time.perf_counter() - began)
        errors += client.stats().errors - before
        if fresh:
            client.close()
        misses += sum(g is None or bytes(g) != b for g, b in zip(got, blobs))
        time.sleep(0.005)
    lat.sort()
    return {"p99": pct(lat, 0.99), "p50": pct(lat, 0.5), "misses": misses, "errors": errors, "calls": len(lat)}


ATTACKS = ("slowloris", "slow PUT", "non-reading GET", "idle connections")


def run_attacks(src: Path | None, seconds: float, new_keys: bool) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as work:
        server = Server(Path(work), ATTACK_CONFIG | (NEW_KEYS if new_keys else {}), src)
        try:
            tier = ServerTier(server.url, "good", timeout=3.0, shared_memory=False)
            keys = [key(10_000 + i) for i in range(8)]
            blobs = [blob(10_000 + i, 512 << 10) for i in range(8)]
            tier.put(list(zip(keys, blobs)))
            out: dict[str, dict[str, Any]] = {}
            ctx = mp.get_context("spawn")
            for kind in ATTACKS:
                fresh = kind == "idle connections"  # that attack is about clients that connect while it runs
                idle = good_phase(tier, keys, blobs, seconds, fresh)
                ready = ctx.Event()
                proc = ctx.Process(target=attack, args=(kind, server.port, seconds + 1.0, ready))
                proc.start()
                ready.wait(60)
                time.sleep(1.0)  # the attack sets in
                under = good_phase(tier, keys, blobs, seconds, fresh)
                proc.join(seconds + 60)
                if not tier.is_up:  # the attack took it down: wait for the client to reconnect for the next one
                    deadline = time.monotonic() + 30
                    while not tier.is_up and time.monotonic() < deadline:
                        time.sleep(0.2)
                tier.put(list(zip(keys, blobs)))  # what an attack evicted comes back for the next one
                out[kind] = {"idle": idle, "attack": under}
            tier.close()
            return out
        finally:
            server.close()


# --- main ----------------------------------------------------------------------------------------------
def extract(ref: str, into: Path) -> Path:
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client-timeout", type=float, default=CacheConfig().tiers.remote.timeout,
                        help="seconds a load client's call may take (default: remote_timeout's default)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--attack-seconds", type=float, default=5.0)
    parser.add_argument("--attack-reps", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="git ref of the code to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base_dir:
        versions: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline:
            versions.insert(0, (f"baseline {args.baseline}", extract(args.baseline, Path(base_dir))))
        loads: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in versions}
        attacks: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name, _ in versions}
        for rep in range(max(args.reps, args.attack_reps)):
            for name, src in versions:
                if rep < args.reps:
                    loads[name].append(run_load(src, args.clients, args.seconds, args.client_timeout))
                    print(name, "load", loads[name][-1], flush=True)
                if rep < args.attack_reps:
                    attacks[name].append(run_attacks(src, args.attack_seconds, new_keys=src is None))
                    print(name, "attacks", json.dumps(attacks[name][-1]), flush=True)
    write_section("server: load and attacks", report(loads, attacks, args), command_line())


def report(loads: dict[str, list[dict[str, Any]]], attacks: dict[str, list[dict[str, dict[str, Any]]]],
           args: argparse.Namespace) -> str:
    def rng(values: list[float], fmt: str = "{:.3g}") -> str:
        return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    rows = []
    for name, runs in loads.items():
        rows.append([name, rng([r["ops_s"] for r in runs], "{:.0f}"),
                     *(rng([1e3 * r["lat"][op][i] for r in runs]) for op in ("get", "put", "exists") for i in (0, 1)),
                     rng([100 * r["hit"] for r in runs], "{:.1f}"), sum(r["errors"] for r in runs),
                     sum(r["down"] for r in runs),
                     sum(r["busy"] for r in runs), sum(r["disk_dropped"] for r in runs),
                     sum(r["wrong"] for r in runs),
                     rng([r["rss"] / MIB for r in runs], "{:.0f}") + f" / {runs[0]['pool'] // MIB}"])
    load_table = table(["code", "ops/s", "GET p50 ms", "GET p99 ms", "PUT p50 ms", "PUT p99 ms", "EXISTS p50 ms",
                        "EXISTS p99 ms", "GET hit %", "client errors", "calls skipped: server marked down",
                        "BUSY replies", "disk writes given up",
                        "wrong bytes", "server RSS MiB / pool MiB"], rows)
    attack_rows = []
    for name, runs in attacks.items():
        for kind in ATTACKS:
            ratios = [r[kind]["attack"]["p99"] / r[kind]["idle"]["p99"] for r in runs]
            attack_rows.append([name, kind, rng([1e3 * r[kind]["idle"]["p99"] for r in runs]),
                                rng([1e3 * r[kind]["attack"]["p99"] for r in runs]), rng(ratios, "{:.2f}x"),
                                f'{sum(r[kind]["idle"]["calls"] for r in runs)} / '
                                f'{sum(r[kind]["attack"]["calls"] for r in runs)}',
                                sum(r[kind]["attack"]["misses"] for r in runs),
                                sum(r[kind]["attack"]["errors"] for r in runs)])
    attack_table = table(["code", "attack", "good GET p99 idle ms", "good GET p99 under attack ms",
                          "ratio (target <= 2x)", "good GETs idle / under attack", "good misses (chunks)",
                          "good errors"], attack_rows)
    return (f"Load: {args.clients} client processes x {args.seconds:g} s, {args.reps} reps (median, range; counts "
            f"summed over reps), 64 MiB pool of 1 MiB pages, 32 MiB disk tier, 300 keys of 64 KiB-1 MiB, client "
            f"timeout {args.client_timeout:g} s.\n\n"
            f"{load_table}\n\nAttacks: {args.attack_seconds:g} s phases, {args.attack_reps} reps; 60 attacking "
            f"threads from 127.0.0.2; server_io_timeout 2 s (this tree also: server_idle_timeout 5 s, "
            f"server_max_client_connections 64); 200 connections at most.\n\n{attack_table}\n\n"
            "Reading the figures: the clients, the attacker and the server share this machine's cores (with "
            "whatever else runs on it), so the load rows measure a saturated machine, and a p99 over one phase "
            "moves with any other process; the ratios are medians over reps, each attack phase against the idle "
            "phase just before it on the same server. The load clients are closed loops: a faster PUT means more "
            "requests of every kind in flight. Both codes run with this tree's client (which takes one timed-out "
            "call for a miss, not for a dead server).\n")


if __name__ == "__main__":
    main()
