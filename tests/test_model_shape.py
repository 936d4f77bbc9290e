"""A stored model's shape: read from config.json and the safetensors index (or files), tolerant of
multimodal and GPT-2 style configs, None where unreadable; carried in the agent's report over real
HTTP; and checked against the KV cache mlx-lm really allocates for the demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from agent_harness import start_agent

from genmlx.agent.store.inventory import describe_model_dir
from genmlx.agent.store.model_shape import UnreadableShape, model_shape_or_none, read_model_shape
from genmlx.master.planning.placement import KvBudget, NodeCapacity, Placement, node_loads
from genmlx.wire.agent_state import ModelShape, StoredModel

pytestmark = pytest.mark.timeout(120)

LLAMA_8B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def model_dir(
    root: Path, config: dict | str, weights: dict[str, int] | None = None, index: dict | None = None
):
    """A model directory with this config.json, weight files of these sizes and an optional index."""
    root.mkdir(parents=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (root / "config.json").write_text(text)
    for name, size in (weights if weights is not None else {"model.safetensors": 1000}).items():
        (root / name).write_bytes(b"\0" * size)
    if index is not None:
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_a_llama_config_and_its_weight_files_give_the_shape(tmp_path: Path):
    path = model_dir(
        tmp_path / "m",
        LLAMA_8B,
        {
            "model-00001-of-00002.safetensors": 700,
            "model-00002-of-00002.safetensors": 300,
            "tokenizer.json": 5000,
        },
    )
    assert read_model_shape(path) == ModelShape(
        weight_bytes=1000,  # the safetensors files only
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,  # 4096 / 32
        kv_dtype_bytes=2,
        max_position_embeddings=131072,
    )


def test_the_index_total_size_wins_over_the_file_sizes(tmp_path: Path):
    path = model_dir(
        tmp_path / "m", LLAMA_8B, index={"metadata": {"total_size": 16_060_522_496}, "weight_map": {}}
    )
    assert read_model_shape(path).weight_bytes == 16_060_522_496


def test_an_unreadable_index_falls_back_to_the_file_sizes(tmp_path: Path):
    path = model_dir(tmp_path / "m", LLAMA_8B, {"model.safetensors": 1234})
    (path / "model.safetensors.index.json").write_text("{truncated")
    assert read_model_shape(path).weight_bytes == 1234


def test_explicit_head_dim_float32_and_missing_kv_heads(tmp_path: Path):
    config = {
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "hidden_size": 1024,
        "head_dim": 128,
        "dtype": "float32",
    }
    shape = read_model_shape(model_dir(tmp_path / "m", config))
    assert (shape.head_dim, shape.num_key_value_heads, shape.kv_dtype_bytes) == (128, 16, 4)
    assert shape.max_position_embeddings is None


def test_a_quantized_model_keeps_a_float16_cache(tmp_path: Path):
    config = {**LLAMA_8B, "torch_dtype": "float32", "quantization": {"group_size": 64, "bits": 4}}
    assert read_model_shape(model_dir(tmp_path / "m", config)).kv_dtype_bytes == 2


def test_a_multimodal_config_is_read_from_its_text_config(tmp_path: Path):
    config = {
        "model_type": "gemma3",
        "torch_dtype": "float32",
        "vision_config": {"num_hidden_layers": 27, "num_attention_heads": 16, "hidden_size": 1152},
        "text_config": {
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "hidden_size": 2560,
            "head_dim": 256,
            "max_position_embeddings": 131072,
        },
    }
    assert read_model_shape(model_dir(tmp_path / "m", config)) == ModelShape(1000, 34, 8, 4, 256, 4, 131072)


def test_gpt2_style_names(tmp_path: Path):
    config = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
    assert read_model_shape(model_dir(tmp_path / "m", config)) == ModelShape(1000, 12, 12, 12, 64, 2, 1024)


@pytest.mark.parametrize(
    ("config", "weights", "problem"),
    [
        ("{not json", None, "cannot read config.json"),
        ("[1, 2]", None, "not a JSON object"),
        ({"num_attention_heads": 32, "hidden_size": 4096}, None, "num_hidden_layers"),
        ({**LLAMA_8B, "num_attention_heads": "32"}, None, "num_attention_heads"),
        ({**LLAMA_8B, "num_hidden_layers": True}, None, "num_hidden_layers"),
        ({"num_hidden_layers": 2, "num_attention_heads": 4}, None, "hidden_size"),
        (LLAMA_8B, {"model.bin": 1000}, "no *.safetensors weights"),
    ],
)
def test_an_unreadable_shape_says_what_is_missing(tmp_path: Path, config, weights, problem: str):
    path = model_dir(tmp_path / "m", config, weights)
    with pytest.raises(UnreadableShape, match=problem.replace("*", r"\*")):
        read_model_shape(path)
    assert model_shape_or_none(path) is None, "the report gets no shape, never an error"


def test_a_directory_without_config_has_no_shape(tmp_path: Path):
    (tmp_path / "m").mkdir()
    assert model_shape_or_none(tmp_path / "m") is None


def test_the_shape_round_trips_through_json_and_old_reports_have_none():
    shape = ModelShape(16_060_522_496, 32, 32, 8, 128, 2, 131072)
    stored = StoredModel("llama", "/s/llama", 16 << 30, True, "hf://o/r", "main", "abc", shape)
    assert StoredModel.from_json(json.loads(json.dumps(stored.to_json()))) == stored
    assert ModelShape.from_json(shape.to_json()) == shape
    old_report = {"name": "llama", "path": "/s/llama", "sizeBytes": 1, "complete": True}
    assert StoredModel.from_json(old_report).shape is None
    assert StoredModel.from_json({**old_report, "shape": None}).shape is None


def test_only_complete_models_get_a_shape(tmp_path: Path, demo_model_dir: Path):
    whole = shutil.copytree(demo_model_dir, tmp_path / "whole")
    assert describe_model_dir(whole).shape == read_model_shape(demo_model_dir)
    broken = shutil.copytree(demo_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    assert describe_model_dir(broken).complete is False
    assert describe_model_dir(broken).shape is None


@pytest.mark.e2e
def test_the_agent_reports_each_models_shape(spawn, token: str, tmp_path: Path, demo_model_dir: Path):
    storage = tmp_path / "storage"
    shutil.copytree(demo_model_dir, storage / "demo-llama")
    odd = shutil.copytree(demo_model_dir, storage / "odd-config")
    (odd / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    agent = start_agent(spawn, token, "node-a", (storage,))
    (report,) = agent.state().storage
    models = {m.name: m for m in report.models}
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert models["demo-llama"].shape == ModelShape(
        weight_bytes=(demo_model_dir / "model.safetensors").stat().st_size,
        num_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["hidden_size"] // config["num_attention_heads"],
        kv_dtype_bytes=4,  # the demo model is float32
        max_position_embeddings=config["max_position_embeddings"],
    )
    assert models["odd-config"].complete and models["odd-config"].shape is None


def test_the_kv_budget_matches_what_mlx_lm_allocates(demo_model_dir: Path):
    """The budget's formula, on the demo model's shape, equals the bytes of mlx-lm's real KV cache
    after exactly one allocation step of tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load

    model, _ = load(str(demo_model_dir))
    cache = make_prompt_cache(model)
    tokens = cache[0].step  # mlx-lm grows the cache in steps; fill exactly one
    model(mx.zeros((1, tokens), dtype=mx.int32), cache=cache)
    mx.eval([c.state for c in cache])
    real_bytes = sum(c.nbytes for c in cache)

    shape = read_model_shape(demo_model_dir)
    single = Placement("single", None, "single")
    (load_on_a,) = node_loads(single, [NodeCapacity("a", 1 << 40)], shape, KvBudget(tokens, 1, "asked"))
    assert load_on_a.kv_bytes == real_bytes
