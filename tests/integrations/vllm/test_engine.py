"""NenCache inside the released vLLM (CPU build), end to end, with SmolLM2-135M in fp32.

Every engine runs in its own process (`engine.run_engine`), as users run vLLM. Every answer must be
plain vLLM's answer token for token (greedy), and vLLM's own `num_cached_tokens` must show the
prefix NenCache held. A prompt of 1400 tokens is 5 whole chunks and a 120-token partial one, so its
reload writes a partially filled block: the case that shows the backend's block layout is right.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integrations.vllm.engine import run_engine
from tests.redis_util import start_server as start_redis
from tests.server.util import ServerProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DOC, DOC_SHORT, DOC_MORE = 1399, 1024, 768  # what NenCache holds of each after "doc" was stored (see conftest)


def corrupt_command(directory: Path) -> str:
    """A shell command that overwrites the middle of every chunk file under `directory`."""
    return (f"find {directory} -type f -size +100k -exec python3 -c \"import sys; f=open(sys.argv[1],'r+b'); "
            f"f.seek(4096); f.write(b'X'*4096); f.close()\" {{}} \\;")


@pytest.fixture(scope="module")
def disk_writer(tmp_path_factory: pytest.TempPathFactory, engine_spec: Any, prompts: dict[str, list[int]]) -> dict[str, Any]:
    """Engine A: NenCache with a disk tier, vLLM's prefix caching off; stores, then reuses in-engine."""
    disk = tmp_path_factory.mktemp("disk")
    connector = {"disk_path": str(disk), "cpu_size": "512MiB"}
    results = run_engine(engine_spec(connector, [
        {"prompts": [prompts["doc"], prompts["other"]]},
        {"prompts": [prompts["doc"], prompts["doc_more"], prompts["doc_short"]]},
    ]))
    return {"disk": disk, "first": results[0], "second": results[1]}


def test_engine_starts_and_answers_exactly_as_plain_vllm(disk_writer: dict[str, Any], plain: dict[str, list[int]]) -> None:
    first = disk_writer["first"]
    assert first["outputs"] == [plain["doc"], plain["other"]]
    assert first["cached"] == [0, 0]


def test_prefix_reused_in_the_same_engine_gives_plain_answers(disk_writer: dict[str, Any], plain: dict[str, list[int]]) -> None:
    second = disk_writer["second"]
    assert second["cached"] == [DOC, DOC_MORE, DOC_SHORT]
    assert second["outputs"] == [plain["doc"], plain["doc_more"], plain["doc_short"]]


def between_lookup_and_load(prompts: dict[str, list[int]], command: str = "") -> list[dict[str, Any]]:
    """A script (one request at a time): "busy" runs a long decode; "doc" is queued meanwhile (its
    lookup pins what NenCache holds) and waits; then `command` runs; "doc" loads after "busy" ends."""
    script: list[dict[str, Any]] = [
        {"add": "busy", "prompt": prompts["busy"], "max_tokens": 96},
        {"wait_tokens": ["busy", 2]},
        {"add": "doc", "prompt": prompts["doc"]},
        {"sleep": 1.5},
    ]
    return script + ([{"run": command}] if command else [])


def assert_window(result: dict[str, Any]) -> None:
    """The command ran before "doc" (the second request) got its first token, i.e. before its load."""
    assert result["ran"] and result["ran"][0] < result["first_token"][1]


def test_restart_reads_the_disk_tier_even_when_its_files_are_damaged_after_the_lookup(
        disk_writer: dict[str, Any], engine_spec: Any, prompts: dict[str, list[int]], plain: dict[str, list[int]]) -> None:
    """Engine B, a new process on A's disk tier. Every chunk file is overwritten between "doc"'s
    lookup and its load: the lookup pinned the chunks in memory, so they load, and the answer is exact."""
    connector = {"disk_path": str(disk_writer["disk"]), "cpu_size": "512MiB"}
    [damaged, after] = run_engine(engine_spec(connector, [
        {"script": between_lookup_and_load(prompts, corrupt_command(disk_writer["disk"]))},
        {"prompts": [prompts["doc_short"]]},
    ], max_num_seqs=1))
    assert_window(damaged)
    assert damaged["cached"] == [0, DOC]
    assert damaged["outputs"][0][:8] == plain["busy"] and damaged["outputs"][1] == plain["doc"]
    assert after["cached"] == [DOC_SHORT] and after["outputs"] == [plain["doc_short"]]


def test_evicted_after_the_lookup_still_loads(engine_spec: Any, prompts: dict[str, list[int]],
                                              plain: dict[str, list[int]]) -> None:
    """Memory only, a pool too small for two prompts. "doc" is stored, then queued behind "flood",
    whose store would evict it before "doc" loads; the lookup pinned it."""
    connector = {"cpu_size": "120MiB"}  # 10 chunk pages: "doc" and "warm" fit, "flood" must evict
    script = [
        {"add": "warm", "prompt": prompts["other"][:300], "max_tokens": 64},
        {"wait_tokens": ["warm", 2]},
        {"add": "flood", "prompt": prompts["busy"]},
        {"add": "doc", "prompt": prompts["doc"]},
    ]
    [stored, squeezed] = run_engine(engine_spec(connector, [{"prompts": [prompts["doc"]]}, {"script": script}],
                                                max_num_seqs=1))
    assert stored["outputs"] == [plain["doc"]]
    assert squeezed["cached"] == [0, 0, DOC]
    assert squeezed["outputs"][1] == plain["busy"] and squeezed["outputs"][2] == plain["doc"]


def test_restart_through_nencache_serve(tmp_path: Path, engine_spec: Any, prompts: dict[str, list[int]],
                                        plain: dict[str, list[int]]) -> None:
    """A writer engine with vLLM's prefix caching on stores through `nencache serve`; a new engine with
    prefix caching off and only the server as its tier gets the prompt back."""
    server = ServerProcess(tmp_path, {"cpu_size": "512MiB", "server_max_chunk_bytes": "16MiB"}).start()
    try:
        connector = {"remote_url": server.url, "cpu_size": "256MiB"}
        [written] = run_engine(engine_spec(connector, [{"prompts": [prompts["doc"], prompts["doc"]]}],
                                           prefix_caching=True))
        [read] = run_engine(engine_spec(connector, [{"prompts": [prompts["doc"], prompts["doc_short"]]}]))
    finally:
        server.kill()
    assert written["outputs"] == [plain["doc"]] * 2
    assert written["cached"] == [0, DOC]  # vLLM's own cache has 10 whole blocks, NenCache the rest
    assert read["cached"] == [DOC, DOC_SHORT]
    assert read["outputs"] == [plain["doc"], plain["doc_short"]]


def test_restart_through_redis_survives_redis_dying_after_the_lookup(
        tmp_path: Path, engine_spec: Any, prompts: dict[str, list[int]], plain: dict[str, list[int]]) -> None:
    """A writer engine stores through Redis. A new engine (prefix caching on) queues "busy" and then
    "other"; "other" is looked up in Redis when queued, and Redis is killed while "busy" runs. "other"
    still loads from what its lookup pinned; later lookups miss quietly."""
    redis = start_redis(tmp_path)
    try:
        connector = {"remote_url": redis.url, "cpu_size": "256MiB"}
        [written] = run_engine(engine_spec(connector, [{"prompts": [prompts["other"]]}], prefix_caching=True))
        script = between_lookup_and_load({**prompts, "doc": prompts["other"]}, f"kill -{int(signal.SIGKILL)} {redis.proc.pid}")
        [killed, after] = run_engine(engine_spec(connector, [{"script": script}, {"prompts": [prompts["doc"]]}],
                                                 prefix_caching=True, max_num_seqs=1))
    finally:
        redis.kill()
    other = len(prompts["other"]) - 1
    assert written["outputs"] == [plain["other"]]
    assert_window(killed)
    assert killed["cached"] == [0, other]
    assert killed["outputs"][0][:8] == plain["busy"] and killed["outputs"][1] == plain["other"]
    assert after["cached"] == [0] and after["outputs"] == [plain["doc"]]
