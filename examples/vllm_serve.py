"""`vllm serve` with NenCache: an OpenAI-compatible server whose prompts reuse KV across a chat's turns.

    python examples/vllm_serve.py --model /path/to/hf-model [--port 8000]

The server is started as you would start it yourself (shown below), then a two-turn chat is sent with
the `openai` client; the second turn's prompt repeats the first turn's, and its
`usage.prompt_tokens_details.cached_tokens` counts what came from the cache. vLLM's own prefix cache is
off here, so every cached token came from NenCache.

    python -m vllm.entrypoints.openai.api_server --model MODEL --dtype float32 --enable-prompt-tokens-details \\
        --no-enable-prefix-caching --kv-transfer-config '{"kv_connector": "NenCacheConnectorV1",
        "kv_connector_module_path": "nencache.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_size": "2GiB"}}'

(`vllm serve MODEL ...` takes the same options where the `vllm` script works; the CPU build's script does not.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONNECTOR = {"kv_connector": "NenCacheConnectorV1", "kv_connector_module_path": "nencache.integrations.vllm",
             "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_size": "2GiB"}}


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not start in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF model directory or id (default: the packaged SmolLM2, exported)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    from openai import OpenAI

    from nencache.integrations.models import english_text, export_smollm2

    model = args.model or str(export_smollm2(Path(tempfile.gettempdir()) / "nencache-examples" / "smollm2-135m-fp32"))
    url = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkdtemp()) / "vllm-serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(args.port),
             "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
             "--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--served-model-name", "model",
             "--kv-transfer-config", json.dumps(CONNECTOR)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc, log)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        messages = [{"role": "system", "content": "Answer briefly using this text:\n\n" + english_text()[:6000]},
                    {"role": "user", "content": "What is the assert statement for?"}]
        for turn in (1, 2):
            reply = client.chat.completions.create(model="model", messages=messages, max_tokens=24, temperature=0)
            cached = reply.usage.prompt_tokens_details.cached_tokens if reply.usage.prompt_tokens_details else 0
            answer = reply.choices[0].message.content or ""
            print(f"turn {turn}: {cached} of {reply.usage.prompt_tokens} prompt tokens from the cache; "
                  f"answer: {answer.strip()!r}")
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And in one word?"}]
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
