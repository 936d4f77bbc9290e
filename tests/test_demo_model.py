"""The demo model is a real mlx-lm llama with a real tokenizer, written deterministically and atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import genmlx.demo.random_model as demo_model
from genmlx.core.errors import PermanentError
from genmlx.demo.random_model import MARKER_FILE, SPECIAL_TOKENS, is_demo_model, write_demo_model


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path):
    from mlx_lm import load

    return load(str(demo_model_dir))


def test_mlx_lm_loads_it_as_llama_and_generates(demo_model_dir: Path, loaded) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = loaded
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == len(tokenizer)
    assert model.model.embed_tokens.weight.shape == (len(tokenizer), config["hidden_size"])
    assert tokenizer.eos_token_ids == set(config["eos_token_id"])

    responses = list(stream_generate(model, tokenizer, "The river", max_tokens=12))
    assert responses[-1].finish_reason == "length"
    assert responses[-1].generation_tokens == 12
    assert "".join(r.text for r in responses).strip()


def test_tokenizer_is_a_trained_byte_level_bpe_that_round_trips(loaded) -> None:
    _, tokenizer = loaded
    assert 512 <= len(tokenizer) <= 1024
    text = "The harbour town woke slowly. Zebras? Café ☕ 42 — naïve!"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Trained merges make common corpus words single tokens, far fewer than one per byte.
    assert len(tokenizer.encode("the river", add_special_tokens=False)) <= 3
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_chat_template_renders_llama3_turns(loaded) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    closed = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert closed.endswith("Hello there<|eot_id|>")


def test_same_seed_writes_the_same_bytes(tmp_path: Path, demo_model_dir: Path) -> None:
    again = write_demo_model(tmp_path / "again", seed=0)
    names = sorted(p.name for p in demo_model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (demo_model_dir / name).read_bytes(), name

    other = write_demo_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_it_says_plainly_that_the_output_is_noise(demo_model_dir: Path) -> None:
    marker = json.loads((demo_model_dir / MARKER_FILE).read_text())
    assert marker["weights"] == "random"
    assert "noise" in marker["note"]
    assert "noise" in (demo_model_dir / "README.md").read_text()
    assert set(marker["files"]) == {p.name for p in demo_model_dir.iterdir()} - {MARKER_FILE}


def test_existing_demo_model_is_reused_and_foreign_directories_are_refused(tmp_path: Path) -> None:
    path = write_demo_model(tmp_path / "model")
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert write_demo_model(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PermanentError, match="not a complete GenMLX demo model"):
        write_demo_model(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    with (path / "model.safetensors").open("r+b") as f:  # a damaged demo model is not reused
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    assert not is_demo_model(path)
    with pytest.raises(PermanentError):
        write_demo_model(path)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_demo_model(write_demo_model(empty))
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_failed_write_leaves_nothing_at_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo_model, "_write_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_demo_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_a_larger_shape_is_written_with_the_same_tokenizer_and_told_apart(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    from mlx_lm import load

    shape = demo_model.ModelShape(
        hidden_size=96, layers=3, attention_heads=4, kv_heads=2, intermediate_size=192
    )
    path = write_demo_model(tmp_path / "larger", shape=shape)
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (96, 3, 192)
    assert (path / "tokenizer.json").read_bytes() == (demo_model_dir / "tokenizer.json").read_bytes()
    assert json.loads((path / MARKER_FILE).read_text())["shape"] == "3 layers, hidden size 96"
    model, tokenizer = load(str(path))
    assert len(model.layers) == 3
    assert write_demo_model(path, shape=shape) == path  # the same shape again: kept
    with pytest.raises(PermanentError, match="different GenMLX demo model"):
        write_demo_model(path)  # the default shape is another model
