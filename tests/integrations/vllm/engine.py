"""One vLLM engine in a child process, driven by a JSON spec: the end-to-end tests' engine.

`run_engine(spec)` starts `python -m tests.integrations.vllm.engine`, which builds `vllm.LLM` (with
NenCache's connector when `spec["connector"]` is set), runs the spec's steps in order and prints one
JSON line per step: the greedy output tokens, vLLM's `num_cached_tokens` and the wall time of each
prompt, in the order given.

A step either generates its `prompts` one after another (`max_tokens` each; `reset` first resets
the prefix cache, connector included), or plays a `script` of actions on the engine, for what
must happen at a precise point of a request's life (between its lookup and its load):
`{"add": NAME, "prompt": ids, "max_tokens": n}` queues a request, `{"wait_tokens": [NAME, k]}`
steps the engine until NAME has k output tokens, `{"sleep": s}` waits while the engine keeps
running, `{"run": "shell command"}` runs a command; then the engine runs until every request ends.

Spec keys: model, connector (kv_connector_extra_config or null), prefix_caching, max_num_seqs,
max_model_len, kv_role, kv_load_failure_policy, tensor_parallel_size, steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
RESULT = "ENGINE-RESULT "


def run_engine(spec: dict[str, Any], *, timeout: float = 600.0, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run `spec` in a fresh engine process; the per-step results (raises with the engine's log on failure)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    child_env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
                      "PYTHONPATH": str(REPO) + os.pathsep + child_env.get("PYTHONPATH", "")})
    child_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "tests.integrations.vllm.engine"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=child_env)
    results = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or len(results) != len(spec["steps"]):
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "error" in line)
        raise AssertionError(f"engine exited {proc.returncode} after {len(results)} of {len(spec['steps'])} steps; "
                             f"its errors:\n{errors[-6000:]}\n--- its last output:\n{proc.stderr[-6000:]}")
    return results


def _engine(spec: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    transfer = None
    if spec.get("connector") is not None:
        transfer = KVTransferConfig(kv_connector="NenCacheConnectorV1", kv_connector_module_path="nencache.integrations.vllm",
                                    kv_role=spec.get("kv_role", "kv_both"), kv_connector_extra_config=spec["connector"],
                                    kv_load_failure_policy=spec.get("kv_load_failure_policy", "fail"))
    return LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0,
               enable_prefix_caching=bool(spec.get("prefix_caching", False)),
               max_model_len=int(spec.get("max_model_len", 4096)), max_num_batched_tokens=int(spec.get("max_model_len", 4096)),
               max_num_seqs=int(spec.get("max_num_seqs", 4)), kv_transfer_config=transfer,
               tensor_parallel_size=int(spec.get("tensor_parallel_size", 1)))


def _generate(llm: Any, step: dict[str, Any]) -> dict[str, list[Any]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=int(step.get("max_tokens", 8)))
    outputs, cached, seconds = [], [], []
    for ids in step["prompts"]:
        started = time.perf_counter()
        [result] = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        seconds.append(time.perf_counter() - started)
        if result.outputs[0].finish_reason not in ("length", "stop"):
            raise RuntimeError(f"request finished with {result.outputs[0].finish_reason!r}")
        outputs.append(list(result.outputs[0].token_ids))
        cached.append(int(result.num_cached_tokens or 0))
    return {"outputs": outputs, "cached": cached, "seconds": seconds}


def _play(llm: Any, script: list[dict[str, Any]]) -> dict[str, list[Any]]:
    from vllm import SamplingParams

    engine = llm.llm_engine
    order: list[str] = []
    results: dict[str, Any] = {}
    started: dict[str, float] = {}
    first_token: dict[str, float] = {}
    ran: list[float] = []

    def pump() -> None:
        for out in engine.step():
            results[out.request_id] = out
            first_token.setdefault(out.request_id, time.perf_counter())
            if out.finished and out.outputs[0].finish_reason not in ("length", "stop"):
                raise RuntimeError(f"request {out.request_id} finished with {out.outputs[0].finish_reason!r}")

    for action in script:
        if "add" in action:
            name = action["add"]
            order.append(name)
            started[name] = time.perf_counter()
            params = SamplingParams(temperature=0.0, max_tokens=int(action.get("max_tokens", 8)))
            engine.add_request(name, {"prompt_token_ids": action["prompt"]}, params)
        elif "wait_tokens" in action:
            name, count = action["wait_tokens"]
            while name not in results or len(results[name].outputs[0].token_ids) < count:
                pump()
        elif "sleep" in action:
            time.sleep(float(action["sleep"]))
        elif "run" in action:
            subprocess.run(action["run"], shell=True, check=False)
            ran.append(time.perf_counter())
    while engine.has_unfinished_requests():
        pump()
    return {"outputs": [list(results[n].outputs[0].token_ids) for n in order],
            "cached": [int(results[n].num_cached_tokens or 0) for n in order],
            "seconds": [first_token[n] - started[n] for n in order],
            "first_token": [first_token[n] for n in order], "ran": ran}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    llm = _engine(spec)
    for step in spec["steps"]:
        if step.get("reset"):
            assert llm.reset_prefix_cache(reset_connector=True), "reset_prefix_cache failed"
        result = _play(llm, step["script"]) if "script" in step else _generate(llm, step)
        print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
