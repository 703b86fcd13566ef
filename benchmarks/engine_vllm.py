"""vLLM (the released CPU build) with and without NenCache: time to first token, and vLLM's own benchmark client.

    .venv-vllm/bin/python benchmarks/engine_vllm.py [--context 3000] [--reps 5] [--skip-ttft] [--skip-client]

Part 1, TTFT on a shared context. Each rep takes a fresh ~3k-token context of real English text and asks
questions about it (a different ~30-token question each time), SmolLM2-135M in fp32, one token generated:
- plain: vLLM without the connector, the context never seen (prefix caching on);
- vLLM's own prefix-cache hit: the same engine, the same context with another question (the floor: the KV
  is already in the engine);
- NenCache, CPU tier: an engine with the connector; its own prefix cache is reset between the storing
  question and the timed one, so the context comes from NenCache's memory pool;
- vLLM's own hit with the connector present: the same engine, a third question, right after;
- NenCache from disk after a restart: a new engine process on the same disk tier (vLLM's cache empty);
- NenCache through `nencache serve`: a new engine process whose only tier is the server.
Within an engine the settings alternate rep by rep; ratios are paired per rep (same context).

Part 2, vLLM's own benchmark client (`vllm.benchmarks.serve`) against its OpenAI server, on its
`prefix_repetition` dataset (2 prefixes of 1024 tokens, 64-token suffixes, 8 requests, concurrency 1), in
four configurations: without the connector; the connector with vLLM's prefix caching off; both on; and
the connector across a server restart (vLLM's cache starts empty, NenCache's disk tier does not).

Run it with the interpreter of `.venv-vllm` (make setup-vllm). Each part writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, paired_ratio, table, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONNECTOR = {"kv_connector": "NenCacheConnectorV1", "kv_connector_module_path": "nencache.integrations.vllm",
             "kv_role": "kv_both"}
QUESTIONS = ["What is described here, in one sentence?", "Which keyword matters most in this text, and why?",
             "Summarise the first paragraph for a beginner.", "What would a reader most likely ask next?"]


# --- child processes ------------------------------------------------------------------------------------
def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an engine spec in a fresh process (as users run vLLM); its timings."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    child_env.update(VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(spec), capture_output=True, text=True,
                          env=child_env, cwd=REPO, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def child() -> None:
    """The engine side: build `LLM`, play the spec's steps, print the timings as one JSON line."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    spec = json.loads(sys.stdin.read())
    transfer = None if spec["connector"] is None else KVTransferConfig(**CONNECTOR,
                                                                      kv_connector_extra_config=spec["connector"])
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0, max_model_len=8192,
              max_num_batched_tokens=8192, enable_prefix_caching=spec["prefix_caching"], kv_transfer_config=transfer)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([{"prompt_token_ids": spec["warmup"]}], params, use_tqdm=False)  # first-call costs, off the clock
    results: dict[str, list[Any]] = {}
    for step in spec["steps"]:
        if step.get("reset_local"):  # vLLM's own prefix cache only; NenCache keeps what it has
            assert llm.reset_prefix_cache(reset_connector=False)
        started = time.perf_counter()
        [out] = llm.generate([{"prompt_token_ids": step["prompt"]}], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        results.setdefault(step["label"], []).append(
            {"seconds": elapsed, "cached": int(out.num_cached_tokens or 0), "token": out.outputs[0].token_ids[0]})
    print("RESULT " + json.dumps(results), flush=True)


# --- part 1: TTFT -------------------------------------------------------------------------------------
def contexts(tokenizer: Any, context: int, reps: int) -> list[list[int]]:
    from nencache.integrations.models import english_text

    ids = tokenizer(english_text())["input_ids"]
    step = (len(ids) - context) // max(1, reps)
    return [ids[i * step : i * step + context] for i in range(reps)]


def ttft(model: Path, context: int, reps: int, chunk_sizes: list[int], workdir: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    questions = [tokenizer("\n\nQuestion: " + q + "\nAnswer:")["input_ids"] for q in QUESTIONS]
    docs = contexts(tokenizer, context, reps)
    warmup = tokenizer("A short warm-up prompt about caches.")["input_ids"]

    def steps(*plan: tuple[str, int, bool]) -> list[dict[str, Any]]:
        """Per rep (context), the (label, question, reset vLLM's own cache first) steps, in order."""
        return [{"label": label, "prompt": doc + questions[q], "reset_local": reset, "question": q}
                for doc in docs for label, q, reset in plan]

    runs: dict[str, list[dict[str, Any]]] = {}
    # Plain vLLM: the context cold (question 0), then vLLM's own hits for every other question (the answers
    # every NenCache run must match).
    plain = run_child({"model": str(model), "connector": None, "prefix_caching": True, "warmup": warmup,
                       "steps": steps(("plain", 0, False), ("vllm_hit", 1, False), ("ref2", 2, False), ("ref3", 3, False))})
    runs.update(plain)
    reference = {q: [r["token"] for r in plain[label]] for q, label in ((1, "vllm_hit"), (2, "ref2"), (3, "ref3"))}
    for chunk in chunk_sizes:
        server = start_nencache_server(workdir)
        disk = workdir / f"disk-{chunk}"
        try:
            connector = {"chunk_size": chunk, "cpu_size": "2GiB", "disk_path": str(disk), "remote_url": server["url"]}
            writer = run_child({"model": str(model), "connector": connector, "prefix_caching": True, "warmup": warmup,
                                "steps": steps(("stored", 0, False), ("nencache_cpu", 1, True),
                                               ("vllm_hit_connector", 2, False))})
            # New processes (vLLM's cache empty) ask a question no engine stored: only the context can hit.
            disk_reader = run_child({"model": str(model), "prefix_caching": False, "warmup": warmup,
                                     "connector": {"chunk_size": chunk, "cpu_size": "2GiB", "disk_path": str(disk)},
                                     "steps": steps(("nencache_disk", 3, False))})
            serve_reader = run_child({"model": str(model), "prefix_caching": False, "warmup": warmup,
                                      "connector": {"chunk_size": chunk, "cpu_size": "2GiB", "remote_url": server["url"]},
                                      "steps": steps(("nencache_serve", 3, False))})
        finally:
            stop(server["proc"])
        for label, rows in {**writer, **disk_reader, **serve_reader}.items():
            runs[f"{label}@{chunk}"] = rows
    seconds = {label: [r["seconds"] for r in rows] for label, rows in runs.items()}
    questions_of = {"vllm_hit": 1, "nencache_cpu": 1, "vllm_hit_connector": 2, "nencache_disk": 3, "nencache_serve": 3}

    def same(label: str) -> str:
        q = questions_of.get(label.split("@")[0])
        if q is None:
            return "-"
        return "yes" if [r["token"] for r in runs[label]] == reference[q] else "NO"

    titles = {"plain": "plain vLLM (context never seen)", "vllm_hit": "vLLM's own prefix-cache hit (floor)",
              "stored": "NenCache, context never seen (stores it)", "nencache_cpu": "NenCache hit, CPU tier",
              "vllm_hit_connector": "vLLM's own hit, connector present", "nencache_disk": "NenCache hit, disk after restart",
              "nencache_serve": "NenCache hit, nencache serve"}
    rows = []
    for label in runs:
        if label.startswith("ref"):
            continue
        base, _, chunk = label.partition("@")
        values = seconds[label]
        rows.append([titles[base] + (f", chunk {chunk}" if chunk else ""),
                     f"{statistics.median(values) * 1000:.0f} ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})",
                     f"{statistics.median(r['cached'] for r in runs[label]):.0f}",
                     paired_ratio(seconds["plain"], values), same(label)])
    goals = []
    for chunk in chunk_sizes:
        cpu = seconds[f"nencache_cpu@{chunk}"]
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu, seconds["vllm_hit"]))
        disk_ratio = statistics.median(a / b for a, b in zip(seconds["plain"], seconds[f"nencache_disk@{chunk}"]))
        goals.append(f"| NenCache CPU-tier hit within 1.3x of vLLM's own prefix-cache hit (chunk {chunk}) | "
                     f"{paired_ratio(cpu, seconds['vllm_hit'])} (against the same engine's own hit: "
                     f"{paired_ratio(cpu, seconds[f'vllm_hit_connector@{chunk}'])}) | {'yes' if cpu_ratio <= 1.3 else 'no'} |")
        goals.append(f"| restored after a restart at least 10x faster than plain (chunk {chunk}) | "
                     f"{paired_ratio(seconds['plain'], seconds[f'nencache_disk@{chunk}'])} | "
                     f"{'yes' if disk_ratio >= 10 else 'no'} |")
    body = (
        f"SmolLM2-135M-Instruct (fp32), contexts of {context} tokens of real English text plus a ~15-token question, "
        f"{reps} reps (a new context each), one token generated, vLLM's block size 128. TTFT is the wall time of "
        "`LLM.generate` for one request. \"cached\" is vLLM's `num_cached_tokens`: NenCache serves whole chunks of "
        "the context (the chunk holding the context's end also holds the question, so it misses), vLLM's own cache "
        "whole 128-token blocks; with 256-token chunks NenCache misses up to 255 tokens of the context where vLLM "
        "misses up to 127. \"same answer\": the first token equals plain vLLM's for the same prompt.\n\n"
        + table(["setting", "TTFT ms, median (range)", "cached tokens", "speed-up over plain (paired)", "same answer"],
                rows)
        + "\n\n| goal | measured | met |\n|---|---|---|\n" + "\n".join(goals) + "\n"
    )
    print(body)
    return body


# --- part 2: vLLM's benchmark client ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_nencache_server(workdir: Path) -> dict[str, Any]:
    """`nencache serve` with its own memory pool (no disk), on free ports."""
    port, admin = free_port(), free_port()
    config = workdir / "server.yaml"
    config.write_text("cpu_size: 2GiB\nserver_max_chunk_bytes: 16MiB\n")
    proc = subprocess.Popen([sys.executable, "-m", "nencache.cli", "serve", "--port", str(port), "--admin-port", str(admin),
                             "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return {"proc": proc, "url": f"nencache://127.0.0.1:{port}"}
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError("nencache serve did not start")


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_vllm_server(model: Path, port: int, connector: dict[str, Any] | None, prefix_caching: bool,
                      log: Path) -> subprocess.Popen[Any]:
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
            "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0",
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    if connector is not None:
        args += ["--kv-transfer-config", json.dumps({**CONNECTOR, "kv_connector_extra_config": connector})]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    deadline = time.monotonic() + 600
    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm server exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError("vllm server did not start")


def bench_client(model: Path, port: int, workdir: Path) -> dict[str, Any]:
    """vLLM's own `vllm bench serve` client, as a child process; its result dict."""
    result = workdir / f"bench-{port}.json"
    args = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--model", str(model),
            "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "1024",
            "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "2",
            "--prefix-repetition-output-len", "32", "--num-prompts", "8", "--max-concurrency", "1", "--seed", "0",
            "--save-result", "--result-dir", str(workdir), "--result-filename", result.name, "--disable-tqdm"]
    code = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
            "from vllm.utils.argparse_utils import FlexibleArgumentParser; p = FlexibleArgumentParser(); "
            "add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"benchmark client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def client(model: Path, workdir: Path) -> str:
    disk = workdir / "client-disk"
    configs = [
        ("vLLM, no connector, prefix caching off", None, False),
        ("NenCache connector, vLLM prefix caching off", {"cpu_size": "2GiB"}, False),
        ("NenCache connector and vLLM prefix caching", {"cpu_size": "2GiB", "disk_path": str(disk)}, True),
        ("NenCache connector after a server restart (disk tier warm, vLLM cache empty)",
         {"cpu_size": "2GiB", "disk_path": str(disk)}, True),
    ]
    rows = []
    for title, connector, prefix_caching in configs:
        port = free_port()
        proc = start_vllm_server(model, port, connector, prefix_caching, workdir / f"vllm-{port}.log")
        try:
            result = bench_client(model, port, workdir)
        finally:
            stop(proc)
        rows.append([title, f"{result['mean_ttft_ms']:.0f}", f"{result['median_ttft_ms']:.0f}",
                     f"{result['p99_ttft_ms']:.0f}", f"{result['request_throughput']:.3f}",
                     f"{result['output_throughput']:.1f}"])
    body = ("`vllm bench serve` (vLLM's client, `vllm.benchmarks.serve`) against `vllm.entrypoints.openai.api_server`, "
            "SmolLM2-135M-Instruct fp32, dataset `prefix_repetition`: 2 prefixes of 1024 tokens, 64-token suffixes, "
            "32 output tokens, 8 requests, concurrency 1, seed 0. The last row restarts the third configuration's "
            "server on the same disk tier and replays the same requests.\n\n"
            + table(["configuration", "mean TTFT ms", "median TTFT ms", "p99 TTFT ms", "requests/s", "output tok/s"], rows))
    print(body)
    return body


def main() -> None:
    if "--child" in sys.argv:
        child()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 128],
                        help="NenCache chunk sizes to run (256 is the default; 128 is vLLM's CPU block size)")
    parser.add_argument("--model", type=Path, default=None, help="an HF directory (default: SmolLM2 converted to fp32)")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-client", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    model = args.model or smollm2_fp32()
    workdir = Path(tempfile.mkdtemp(prefix="nencache-engine-bench-"))
    try:
        if not args.skip_ttft:
            body = ttft(model, args.context, args.reps, args.chunk_sizes, workdir)
            if not args.no_write:
                write_section("vLLM engine: TTFT on a shared context", body, command_line())
        if not args.skip_client:
            body = client(model, workdir)
            if not args.no_write:
                write_section("vLLM engine: vLLM's benchmark client, prefix repetition", body, command_line())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def smollm2_fp32() -> Path:
    """The packaged SmolLM2 GGUF as an fp32 HF directory (the same export the tests use)."""
    from nencache.integrations.models import export_smollm2

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return export_smollm2(cache / "nencache-tests" / "smollm2-135m-fp32")


if __name__ == "__main__":
    main()
