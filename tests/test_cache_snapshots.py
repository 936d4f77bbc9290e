"""Prompt caches beyond plain KV blocks, on real mlx-lm caches and models.

A model with a sliding window (the demo llama with its second layer made a sliding-attention layer
of 32 tokens) keeps a ``RotatingKVCache`` that no slice of positions reproduces: the prefix cache
keeps whole-state snapshots, at the system prompt's end as the decoder passes it, where the prompt
ends and where the sequence ends; after a restart a new conversation with the same system prompt
starts from its snapshot with the same tokens as a cold run, alone and in a batch. A quantized KV
cache (``serving.kvBits``) is stored in blocks of its quantized arrays and read back after a
restart with the same tokens, and never read as another quantization. Every kind of layer state
survives the block file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from genmlx.dispatcher.engine.cache_layout import CacheLayout, cache_from_state, cache_layout, state_arrays
from genmlx.dispatcher.engine.decoders import SequentialDecoder, make_decoder
from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings
from genmlx.dispatcher.engine.disk_tier import DiskTier, DiskTierSettings, decode_block, encode_block
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling

WINDOW = 32
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def sliding_model(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("models") / "demo-sliding"
    shutil.copytree(demo_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(layer_types=["full_attention", "sliding_attention"], sliding_window=WINDOW)
    (directory / "config.json").write_text(json.dumps(config))
    return load(str(directory))


def tokens_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def request(name: str, system: list[int], user: list[int]) -> GenerationRequest:
    prompt = (*system, *user)
    return GenerationRequest(name, prompt, MAX_TOKENS, Sampling(temperature=0), boundaries=(len(system),))


def decode(decoder, requests: dict[int, GenerationRequest]) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Join every request in one step, then step until all ended: each one's tokens and how many
    prompt tokens the prefix cache supplied."""
    cached = {uid: decoder.join(uid, r) for uid, r in requests.items()}
    tokens: dict[int, list[int]] = {uid: [] for uid in requests}
    while decoder.active:
        for sampled in decoder.step():
            tokens[sampled.uid].append(sampled.token)
    return tokens, cached


def cold(model, tokenizer, one: GenerationRequest) -> list[int]:
    """The tokens of ``one`` on a decoder without any prefix cache."""
    decoder = BatchDecoder(model, set(tokenizer.eos_token_ids), DecoderSettings(cache_entries=0))
    return decode(decoder, {0: one})[0][0]


def disk_tier(root: Path, block_tokens: int = 256) -> DiskTier:
    return DiskTier(DiskTierSettings(root / "namespace", 1 << 30, block_tokens))


def test_a_sliding_window_model_keeps_whole_state_snapshots_and_a_new_conversation_starts_from_one(
    sliding_model, tmp_path
):
    model, tokenizer = sliding_model
    eos = set(tokenizer.eos_token_ids)
    layout = cache_layout(model)
    assert (layout.kind, layout.classes) == ("snapshots", ("KVCache", "RotatingKVCache"))
    system = tokens_of(tokenizer, " ".join(f"rule {i}: keep answers short;" for i in range(12)))
    assert len(system) > 3 * WINDOW, "past the window: the sliding layer's cache cannot be cut back"
    first = request("a", system, tokens_of(tokenizer, " How do rivers form?"))
    second = request("b", system, tokens_of(tokenizer, " Why is the sea salty?"))
    expected = {0: cold(model, tokenizer, first), 1: cold(model, tokenizer, second)}

    disk = disk_tier(tmp_path)
    decoder = BatchDecoder(model, eos, DecoderSettings(disk_tier=disk))
    tokens, cached = decode(decoder, {0: first})
    assert (tokens[0], cached[0]) == (expected[0], 0)
    disk.close()
    lengths = sorted(int(p.stem.rsplit("-", 1)[1]) for p in disk.settings.root.glob("*/*.safetensors"))
    prompt = len(first.prompt_tokens)
    assert lengths == [len(system), prompt - 1, prompt + MAX_TOKENS - 1], (
        "the system prompt's end, the prompt's end short of its last token, the sequence's end"
    )

    disk = disk_tier(tmp_path)  # restarted: nothing in memory
    settings = DecoderSettings(disk_tier=disk)
    decoder = BatchDecoder(model, eos, settings)
    tokens, cached = decode(decoder, {1: second})
    assert (tokens[1], cached[1]) == (expected[1], len(system)), (
        "the new conversation: from the system prompt"
    )
    tokens, cached = decode(decoder, {0: first})
    assert (tokens[0], cached[0]) == (expected[0], prompt - 1), (
        "the same prompt again: all but its last token"
    )
    assert (settings.stats.disk_kind, settings.stats.disk_hits, settings.stats.lookups) == ("snapshots", 2, 2)
    disk.close()


def test_in_a_batch_the_snapshot_is_taken_where_the_system_prompt_ends(sliding_model, tmp_path):
    model, tokenizer = sliding_model
    eos = set(tokenizer.eos_token_ids)
    systems = [
        tokens_of(tokenizer, " ".join(f"{topic} fact {i};" for i in range(14))) for topic in ("river", "sea")
    ]
    disk = disk_tier(tmp_path)
    decoder = BatchDecoder(model, eos, DecoderSettings(disk_tier=disk))
    joined = {
        uid: request(f"r{uid}", system, tokens_of(tokenizer, " Tell me more."))
        for uid, system in enumerate(systems)
    }
    _, cached = decode(decoder, joined)  # the first starts alone, the second joins: both move into the batch
    assert cached == {0: 0, 1: 0}
    disk.close()

    disk = disk_tier(tmp_path)
    decoder = BatchDecoder(model, eos, DecoderSettings(disk_tier=disk))
    asked = request("c", systems[1], tokens_of(tokenizer, " And the tides?"))
    tokens, cached = decode(decoder, {0: asked})
    assert cached[0] == len(systems[1])
    assert tokens[0] == cold(model, tokenizer, asked)
    disk.close()


def test_a_quantized_kv_cache_goes_to_disk_in_blocks_of_its_quantized_arrays(tmp_path):
    from genmlx.demo.random_model import ModelShape, write_demo_model

    # Heads of 64 values, which 8-bit groups of 64 can quantize (the demo model's have 16).
    shape = ModelShape(hidden_size=128, layers=2, attention_heads=2, kv_heads=1, intermediate_size=256)
    model, tokenizer = load(str(write_demo_model(tmp_path / "heads-of-64", shape=shape)))
    eos = set(tokenizer.eos_token_ids)
    text = " ".join(f"line {i} of a long preamble;" for i in range(20))
    asked = GenerationRequest("q", tuple(tokens_of(tokenizer, text)), MAX_TOKENS, Sampling(temperature=0))
    assert len(asked.prompt_tokens) > 3 * 32

    disk = disk_tier(tmp_path, block_tokens=32)
    decoder = make_decoder(model, eos, DecoderSettings(disk_tier=disk, kv_bits=8))
    assert isinstance(decoder, SequentialDecoder)
    expected, _ = decode(decoder, {0: asked})
    disk.close()
    block, _ = decode_block(next(disk.settings.root.glob("*/*.safetensors")).read_bytes())
    assert block["layers.0.keys.0"].dtype == mx.uint32, "the packed values, as the quantized cache holds them"

    disk = disk_tier(tmp_path, block_tokens=32)
    decoder = make_decoder(model, eos, DecoderSettings(disk_tier=disk, kv_bits=8))
    tokens, cached = decode(decoder, {0: asked})
    assert (tokens, cached) == (expected, {0: len(asked.prompt_tokens) - 1})
    disk.close()

    # Blocks of 8-bit values are never read as 4-bit ones, nor as plain KV: a miss, the cold answer.
    for bits in (4, None):
        disk = disk_tier(tmp_path, block_tokens=32)
        decoder = make_decoder(model, eos, DecoderSettings(disk_tier=disk, kv_bits=bits))
        tokens, cached = decode(decoder, {0: asked})
        alone = make_decoder(model, eos, DecoderSettings(cache_entries=0, kv_bits=bits))
        assert (tokens, cached) == (decode(alone, {0: asked})[0], {0: 0}), bits
        disk.close()


def test_the_disk_tiers_namespace_changes_with_the_kv_caches_quantization(tmp_path, demo_model_dir):
    from genmlx.dispatcher.settings import disk_tier_settings, parse_settings

    def root(*extra: str) -> Path:
        argv = [
            "--model",
            str(demo_model_dir),
            "--name",
            "demo",
            "--port",
            "1",
            "--disk-cache-dir",
            str(tmp_path),
        ]
        return disk_tier_settings(parse_settings([*argv, "--disk-cache-gb", "1", *extra])).root

    roots = {
        root(),
        root("--kv-bits", "8"),
        root("--kv-bits", "4"),
        root("--kv-bits", "8", "--kv-group-size", "32"),
    }
    assert len(roots) == 4 and root("--kv-bits", "8") == root("--kv-bits", "8")


def test_every_kind_of_layer_state_survives_the_block_file():
    window = RotatingKVCache(max_size=8, keep=2)
    window.update_and_fetch(mx.arange(40.0).reshape(1, 1, 20, 2), mx.ones((1, 1, 20, 2)))
    window.update_and_fetch(mx.full((1, 1, 1, 2), 7.0), mx.zeros((1, 1, 1, 2)))  # rotated in place
    plain = KVCache()
    plain.update_and_fetch(mx.arange(6.0).reshape(1, 1, 3, 2), -mx.arange(6.0).reshape(1, 1, 3, 2))
    recurrent = ArraysCache(2)
    recurrent[0] = mx.arange(12.0).reshape(1, 3, 4)  # the second slot was never set: None
    quantized = KVCache()
    quantized.update_and_fetch(mx.ones((1, 1, 5, 64)), mx.ones((1, 1, 5, 64)))
    quantized = quantized.to_quantized(group_size=64, bits=4)
    caches = [window, plain, recurrent, quantized]
    layout = CacheLayout("snapshots", 4, None, tuple(type(c).__name__ for c in caches))

    arrays, meta = state_arrays(caches)
    read, read_meta = decode_block(encode_block(arrays, meta))
    restored = cache_from_state(read, read_meta, layout)

    assert [type(c) for c in restored] == [type(c) for c in caches]
    assert (restored[0].offset, restored[0].keep, restored[0].max_size, restored[0]._idx) == (
        21,
        2,
        8,
        window._idx,
    )
    for before, after in ((window, restored[0]), (plain, restored[1])):
        for a, b in zip(before.keys_and_values(), after.keys_and_values(), strict=True):
            assert mx.array_equal(a, b).item()
    assert restored[2][1] is None and mx.array_equal(restored[2][0], recurrent[0]).item()
    assert (restored[3].offset, restored[3].bits, restored[3].group_size) == (5, 4, 64)
    for a, b in zip(quantized.keys_and_values()[0], restored[3].keys_and_values()[0], strict=True):
        assert mx.array_equal(a, b).item()
    with pytest.raises(ValueError, match="this model keeps"):
        cache_from_state(read, read_meta, CacheLayout("snapshots", 4, None, ("KVCache",) * 4))
