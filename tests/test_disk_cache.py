"""The prompt cache's disk tier. In process, on real mlx-lm KV caches: a finished sequence's whole
blocks are written in the background and a later prompt (another process's cache on the same
directory, as after a restart) reads back its longest run of leading blocks, the same arrays;
a damaged block is a miss and is removed; the least recently used blocks go first when the tier
is full. Through a real dispatcher: a prompt of a few thousand tokens, the dispatcher restarted,
the same prompt is answered from disk (cached tokens: its whole blocks) with the same tokens at
temperature 0, a corrupted block changes nothing but the cache count, and new weights (another
commit in the model's record) find nothing."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import urllib.request
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from agent_harness import call
from conftest import Proc, free_port, http_status, wait_until
from mlx_lm.models.cache import KVCache
from test_cluster import Cluster, ready_cluster
from test_ranks_lockstep import MODEL, client_of
from test_ranks_lockstep import qwen2_model_dir as qwen2_model_dir  # fixtures, used by name
from test_ranks_lockstep import start_ranks as start_ranks
from test_ui_page import browser as browser  # a fixture, used by name

from genmlx.dispatcher.engine.cache_layout import CacheLayout
from genmlx.dispatcher.engine.disk_tier import (
    DiskTier,
    DiskTierSettings,
    block_keys,
    decode_block,
    encode_block,
)
from genmlx.dispatcher.engine.prefix_cache import PrefixCache, PromptCacheStats

BLOCK = 4
LAYERS = 2
PLAIN = CacheLayout("blocks", LAYERS, None, ("KVCache",) * LAYERS)


def kv_state(tokens: list[int], dtype=mx.bfloat16) -> list[KVCache]:
    """A two-layer KV cache that has read ``tokens`` (each token's keys are its id, values its negative)."""
    caches = []
    for layer in range(LAYERS):
        cache = KVCache()
        keys = mx.array(tokens, dtype=dtype).reshape(1, 1, len(tokens), 1) + layer
        cache.update_and_fetch(keys, -keys)
        caches.append(cache)
    return caches


def tier(root: Path, max_bytes: int = 1 << 30) -> DiskTier:
    return DiskTier(DiskTierSettings(root, max_bytes, BLOCK))


def caches(
    root: Path, max_bytes: int = 1 << 30, stats: PromptCacheStats | None = None
) -> tuple[PrefixCache, DiskTier]:
    disk = tier(root, max_bytes)
    return PrefixCache(16, disk=disk, layout=PLAIN, stats=stats), disk


def test_blocks_are_named_by_a_chain_of_their_tokens():
    first = block_keys("ns", list(range(12)), BLOCK)
    assert len(first) == 3 and len(set(first)) == 3
    assert block_keys("ns", list(range(11)), BLOCK) == first[:2], "only whole blocks"
    assert block_keys("ns", [*range(8), 99, 99, 99, 99], BLOCK)[:2] == first[:2], "a shared prefix"
    assert block_keys("ns", [7, *range(1, 12)], BLOCK)[1] != first[1], (
        "the chain: an earlier change moves every later key"
    )
    assert block_keys("other", list(range(12)), BLOCK)[0] != first[0], "and the namespace"


def test_a_block_file_is_safetensors_mlx_reads_and_its_checksum_guards_it(tmp_path):
    arrays = {
        "layers.0.keys": mx.arange(8, dtype=mx.bfloat16).reshape(1, 1, 4, 2),
        "layers.0.values": mx.ones((1, 1, 4, 2)),
    }
    data = encode_block(arrays)
    (tmp_path / "b.safetensors").write_bytes(data)
    read, metadata = mx.load(str(tmp_path / "b.safetensors"), return_metadata=True)
    assert metadata["format"] == "genmlx-kv-block/1" and len(metadata["sha256"]) == 64
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and mx.array_equal(read[name], array).item()
        assert mx.array_equal(decode_block(data)[0][name], array).item()
    damaged = bytearray(data)
    damaged[-3] ^= 0x10
    with pytest.raises(ValueError, match="checksum"):
        decode_block(bytes(damaged))


def test_a_later_process_reads_back_the_longest_run_of_leading_blocks(tmp_path):
    prompt = list(range(100, 114))  # 14 tokens: 3 whole blocks
    writer, disk = caches(tmp_path)
    writer.put(prompt, kv_state(prompt))
    disk.close()  # what a dispatcher's shutdown does: the queue is written out
    assert disk.stats.entries == 4, "three whole blocks and a snapshot where the sequence ended"

    stats = PromptCacheStats()
    reader, disk = caches(tmp_path, stats=stats)  # a restarted dispatcher: nothing in memory
    asked = [*prompt[:10], 7, 7, 7, 7, 7]  # shares two whole blocks and two more tokens
    reused = reader.take(asked)
    assert reused.tokens == 2 * BLOCK
    keys, values = reused.cache[1].keys_and_values()
    assert keys.reshape(-1).tolist() == [t + 1 for t in prompt[: 2 * BLOCK]] and keys.dtype == mx.bfloat16
    assert values.reshape(-1).tolist() == [-(t + 1) for t in prompt[: 2 * BLOCK]]
    assert reused.cache[0].offset == 2 * BLOCK
    assert reader.take(prompt).tokens == 3 * BLOCK, "every whole block short of the last token"
    assert reader.take([1, 2, 3, 4, 5, 6]) is None
    assert (stats.lookups, stats.disk_hits, stats.disk_hit_tokens, stats.memory_hits) == (3, 2, 5 * BLOCK, 0)
    disk.close()


def test_snapshots_at_the_prompts_end_and_the_sequences_find_the_same_prompt_and_the_next_turn(tmp_path):
    prompt, reply = list(range(100, 110)), [7, 8, 9]  # 10 prompt tokens, then what was generated
    writer, disk = caches(tmp_path)
    writer.put(prompt + reply, kv_state(prompt + reply), boundaries=[len(prompt) - 1])
    disk.close()
    reader, disk = caches(tmp_path)
    assert reader.take(prompt).tokens == 9, "the same prompt again: all but its last token"
    next_turn = [*prompt, *reply, 55, 56, 57]
    reused = reader.take(next_turn)
    assert reused.tokens == 13, "the next turn: everything the last sequence read"
    keys, _ = reused.cache[0].keys_and_values()
    assert keys.reshape(-1).tolist() == next_turn[:13]
    assert reader.take([*prompt[:8], 99, 98, 97]).tokens == 2 * BLOCK, "elsewhere: whole blocks only"
    disk.close()


def test_memory_wins_where_it_holds_more_and_disk_where_it_holds_more(tmp_path):
    cache, disk = caches(tmp_path)
    prompt = list(range(9))
    cache.put(prompt, kv_state(prompt))
    assert cache.take([*prompt, 50]).tokens == 9, "memory holds all nine; disk two blocks"
    disk.close()


def test_a_damaged_block_is_a_miss_and_is_removed(tmp_path):
    prompt = list(range(12))
    writer, disk = caches(tmp_path)
    writer.put(prompt, kv_state(prompt))
    disk.close()
    second = tmp_path / block_keys(tmp_path.name, prompt, BLOCK)[1][:2]
    (path,) = second.glob(f"{block_keys(tmp_path.name, prompt, BLOCK)[1]}.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    reader, disk = caches(tmp_path)
    assert reader.take([*prompt, 1]).tokens == BLOCK, "the run stops short of the damaged block"
    assert disk.stats.damaged == 1 and not path.exists()
    reader.put(prompt, kv_state(prompt))  # written again
    disk.close()
    reader, disk = caches(tmp_path)
    assert reader.take([*prompt, 1]).tokens == 12
    disk.close()


def test_the_least_recently_used_blocks_go_first_when_the_tier_is_full(tmp_path):
    one_block = len(
        encode_block(
            {
                f"layers.{i}.{kind}": mx.zeros((1, 1, BLOCK, 1), dtype=mx.bfloat16)
                for i in range(LAYERS)
                for kind in ("keys", "values")
            },
            {"cache": "kv"},
        )
    )
    cache, disk = caches(tmp_path, max_bytes=3 * one_block)
    old, new = list(range(8)), list(range(50, 58))
    cache.put(old, kv_state(old))
    disk.close()
    cache, disk = caches(tmp_path, max_bytes=3 * one_block)
    os.utime(next(tmp_path.glob("*/*.safetensors")), (1, 1))  # make the first block written the oldest
    cache.put(new, kv_state(new))
    disk.close()
    assert disk.stats.entries == 3 and disk.stats.bytes <= 3 * one_block


# ----------------------------------------------------------------------------------------------
# Through a real dispatcher, restarted


class Dispatcher:
    """``python -m genmlx.dispatcher`` on a copy of the demo model with a disk tier, restartable."""

    def __init__(self, model_dir: Path, cache_dir: Path, log_dir: Path):
        self.model_dir, self.cache_dir, self.log_dir = model_dir, cache_dir, log_dir
        self.token = secrets.token_hex(16)
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        port = free_port()
        args = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(self.model_dir), "--name", "demo"]
        args += ["--port", str(port), "--disk-cache-dir", str(self.cache_dir), "--disk-cache-gb", "1"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GENMLX_API_TOKEN": self.token}
        self.starts += 1
        self.proc = Proc(args, self.log_dir / f"dispatcher.{self.starts}.log", env)
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(self.url + "/health") == 200, 120, what="the dispatcher to load")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            print(f"----- dispatcher start {self.starts} -----\n{self.proc.output()}")
            self.proc = None

    def metrics(self) -> str:
        request = urllib.request.Request(
            f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def ask(self, prompt: str) -> tuple[str, int, int]:
        """The reply at temperature 0, its prompt tokens and how many came from the cache."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.token, max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
        )
        usage = reply.usage
        return (
            reply.choices[0].message.content,
            usage.prompt_tokens,
            usage.prompt_tokens_details.cached_tokens,
        )


@pytest.fixture
def dispatchers(tmp_path):
    """``dispatchers(model_dir)``: a restartable dispatcher with a disk tier, stopped at the end."""
    made: list[Dispatcher] = []

    def make(model_dir: Path) -> Dispatcher:
        made.append(Dispatcher(model_dir, tmp_path / "kv-cache", tmp_path))
        return made[-1]

    yield make
    for dispatcher in made:
        dispatcher.stop()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_restarted_dispatcher_answers_a_long_prompt_from_disk_with_the_same_tokens(
    tmp_path, demo_model_dir, dispatchers
):
    model = tmp_path / "demo"
    shutil.copytree(demo_model_dir, model)
    record = {"files": [{"path": "model.safetensors", "size": 1, "sha256": "0" * 64}], "commit": "a" * 40}
    (model / ".genmlx-model.json").write_text(json.dumps(record))  # as an agent records a verified copy
    cache_dir = tmp_path / "kv-cache"
    dispatcher = dispatchers(model)
    prompt = " ".join(f"line {i} of the system prompt and the tools;" for i in range(75))
    dispatcher.start()
    cold, prompt_tokens, cached = dispatcher.ask(prompt)
    assert cached == 0 and 1500 < prompt_tokens < 2040, prompt_tokens
    whole_blocks = (prompt_tokens - 1) // 256
    files = whole_blocks + 2  # and snapshots where the prompt and the sequence ended
    wait_until(lambda: len(list(cache_dir.glob("*/*/*.safetensors"))) == files, 60, what="the blocks")
    dispatcher.stop()

    dispatcher.start()  # nothing in memory: the disk tier answers, all but the prompt's last token
    again, _, cached = dispatcher.ask(prompt)
    assert (again, cached) == (cold, prompt_tokens - 1)
    metrics = dispatcher.metrics()
    assert (
        f'genmlx:prompt_cache_hit_tokens_total{{model_name="demo",tier="disk"}} {prompt_tokens - 1}.0'
        in metrics
    )
    assert 'genmlx:prompt_cache_hits_total{model_name="demo",tier="memory"} 0.0' in metrics
    assert f'genmlx:prompt_cache_entries{{model_name="demo",tier="disk"}} {files}.0' in metrics
    assert 'genmlx:prompt_cache_lookups_total{model_name="demo"} 1.0' in metrics
    dispatcher.stop()

    # A damaged block: the run stops short of it; the answer is the same.
    blocks = list(cache_dir.glob("*/*/*.safetensors"))
    newest = max(blocks, key=lambda p: p.stat().st_mtime)
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    dispatcher.start()
    damaged, _, cached = dispatcher.ask(prompt)
    assert damaged == cold and cached < prompt_tokens - 1
    dispatcher.stop()

    # New weights (another commit in the record): another namespace, nothing found.
    (model / ".genmlx-model.json").write_text(json.dumps({**record, "commit": "b" * 40}))
    dispatcher.start()
    fresh, _, cached = dispatcher.ask(prompt)
    assert (fresh, cached) == (cold, 0)
    dispatcher.stop()
    assert len({p.parent.parent for p in cache_dir.glob("*/*/*.safetensors")}) == 2


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize("parallelism", ["tensor", "pipeline"])
def test_a_restarted_group_reads_each_ranks_shard_from_its_disk_and_agrees_on_what_all_can_read(
    start_ranks, qwen2_model_dir, token, tmp_path, parallelism
):
    cache_dir = tmp_path / "kv-cache"
    disk = ("--disk-cache-dir", str(cache_dir), "--disk-cache-gb", "1", "--parallelism", parallelism)
    prompt = " ".join(f"line {i} of the system prompt and the tools;" for i in range(75))

    def ask(group) -> tuple[str, int, int]:
        reply = client_of(group[0], token).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
        )
        usage = reply.usage
        return (
            reply.choices[0].message.content,
            usage.prompt_tokens,
            usage.prompt_tokens_details.cached_tokens,
        )

    def stop(group) -> None:
        for rank in group:
            rank.proc.stop()

    group = start_ranks(qwen2_model_dir, 2, *disk)
    cold, prompt_tokens, cached = ask(group)
    whole_blocks = (prompt_tokens - 1) // 256
    assert cached == 0 and whole_blocks >= 5
    stop(group)  # each rank writes out its queue before it exits
    namespaces = {p.parent.parent for p in cache_dir.glob("*/*/*.safetensors")}
    assert len(namespaces) == 2, "one namespace per rank: each keeps its own shard"
    assert all(len(list(ns.glob("*/*.safetensors"))) == whole_blocks + 2 for ns in namespaces)

    group = start_ranks(qwen2_model_dir, 2, *disk)
    assert ask(group) == (cold, prompt_tokens, prompt_tokens - 1), "from every rank's disk"
    stop(group)

    # One of one rank's blocks is damaged: the group agrees on the run before it (the same on every
    # rank, or the group would break), answers the same and stays whole.
    one_rank = sorted(namespaces)[0]
    files = sorted(one_rank.glob("*/*.safetensors"))
    whole = max(p.stat().st_size for p in files)  # a whole block, not a shorter snapshot
    next(p for p in files if p.stat().st_size == whole).write_bytes(b"\0" * 64)
    group = start_ranks(qwen2_model_dir, 2, *disk)
    text, _, cached = ask(group)
    assert text == cold and cached < prompt_tokens - 1, cached
    assert ask(group)[0] == cold, "the group is still whole and in step"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_new_conversation_with_the_same_system_prompt_starts_from_its_snapshot(
    tmp_path, demo_model_dir, dispatchers
):
    from mlx_lm.utils import load_tokenizer

    from genmlx.dispatcher.api.chat import ChatMessage
    from genmlx.dispatcher.api.prompts import chat_prompt_tokens, system_prompt_boundary

    system = " ".join(f"rule {i}: answer briefly and cite the tools;" for i in range(40))
    first = (ChatMessage("system", system), ChatMessage("user", "How do rivers form?"))
    tokenizer = load_tokenizer(demo_model_dir)
    prompt = chat_prompt_tokens(tokenizer, first)
    boundary = system_prompt_boundary(tokenizer, first, (), prompt)
    assert boundary is not None and boundary % 256, "the system turn ends inside a block"

    dispatcher = dispatchers(demo_model_dir)
    dispatcher.start()
    client = openai.OpenAI(
        base_url=f"{dispatcher.url}/v1", api_key=dispatcher.token, max_retries=0, timeout=300
    )

    def chat(user: str) -> int:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=4, temperature=0)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert chat("How do rivers form?") == 0
    dispatcher.stop()
    dispatcher.start()
    client = openai.OpenAI(
        base_url=f"{dispatcher.url}/v1", api_key=dispatcher.token, max_retries=0, timeout=300
    )
    assert chat("Why is the sea salty?") == boundary, "every token of the system turn, not just whole blocks"
    dispatcher.stop()


class DiskCacheCluster(Cluster):
    """A master and an agent serving the demo model with a prompt cache on disk."""

    def models_text(self, max_batch: int) -> str:
        serving = f"maxBatch: {max_batch}, port: {self.serving_port}, diskCacheGB: 1"
        return self.model_entry(MODEL, self.storage / MODEL, serving)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_status_shows_each_nodes_prompt_cache_and_cache_clear_empties_it(
    tmp_path, demo_model_dir, browser
):
    with ready_cluster(tmp_path, demo_model_dir, DiskCacheCluster) as cluster:
        prompt = " ".join(f"line {i} of a long shared preamble;" for i in range(60))
        for _ in range(2):  # the second time, from memory
            reply = cluster.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0
            )
        assert reply.usage.prompt_tokens > 512
        assert reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1

        def tiers() -> dict | None:
            """Each tier as rank 0 counts it, once the status has the hit from memory (the master's
            canary completions are lookups too)."""
            counted = {tier["tier"]: tier for tier in cluster.status()["models"][0].get("promptCache", [])}
            return counted if counted.get("memory", {}).get("hits") else None

        counted = wait_until(tiers, 60, what="the status to show the prompt cache's tiers")
        memory, disk = counted["memory"], counted["disk"]
        assert memory["lookups"] >= 3 and memory["hitTokens"] >= reply.usage.prompt_tokens - 1
        assert memory["entries"] >= 1 and memory["bytes"] > 0
        assert disk["kind"] == "blocks" and disk["hits"] == 0 and disk["lookups"] == memory["lookups"]
        described = cluster.cli("describe", "model", MODEL, "--master", cluster.url).stdout
        assert "Prompt cache:" in described and "  disk (blocks): " in described, described
        pattern = r"memory: \d+ entries, [\d.]+ MB, hit rate \d+% \(\d+ of \d+ prompts"
        assert re.search(pattern, described), described

        directory = cluster.home / "kv-cache" / MODEL

        def cached_on_disk() -> dict | None:
            """The status's report of the cache, once it counts every file written."""
            (model,) = cluster.status()["models"]
            caches = model.get("promptCaches", [])
            files = len(list(directory.glob("*/*/*.safetensors")))
            return caches[0] if caches and caches[0]["blocks"] == files >= 2 else None

        held = wait_until(cached_on_disk, 60, what="the status to show the prompt cache on disk")
        assert held["node"] == "local" and held["bytes"] > 0
        login = call("POST", f"{cluster.url}/api/v1/ui/login", cluster.token, {})
        page = browser.new_page()
        page.goto(cluster.url + login.json()["url"])
        page.wait_for_selector("#model-cards dt >> text=Prompt cache on disk", timeout=60_000)
        card = page.locator("#model-cards").inner_text()
        assert "local: " in card and f" in {held['blocks']} files" in card, card
        assert re.search(
            r"Prompt cache, memory\s+\d+ entries, .* · \d+% hit rate \(\d+ of \d+ prompts\)", card
        ), card
        assert "Prompt cache, disk" in card and ", blocks ·" in card, card

        refused = cluster.cli(
            "cache", "clear", MODEL, "--master", cluster.url, env={"GENMLX_HOME": str(tmp_path / "elsewhere")}
        )
        assert refused.returncode != 0 and list(directory.glob("*/*/*.safetensors")), "the token is required"
        cleared = cluster.cli("cache", "clear", MODEL, "--master", cluster.url)
        assert cleared.returncode == 0, cleared.stderr
        assert (
            "local" in cleared.stdout
            and f"freed {held['bytes']} bytes in {held['blocks']} blocks" in cleared.stdout
        )
        assert not list(directory.glob("*/*/*.safetensors"))
        wait_until(
            lambda: not cluster.status()["models"][0].get("promptCaches"),
            30,
            what="the status to show it emptied",
        )
        # The dispatcher still serves, from what memory holds, and writes to disk again.
        again = cluster.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt + " more"}], max_tokens=4, temperature=0
        )
        assert again.usage.completion_tokens == 4
        unknown = cluster.cli("cache", "clear", "nope", "--master", cluster.url)
        assert unknown.returncode != 0 and "nope" in unknown.stderr
