"""A tiny random-weight llama that mlx-lm loads, for tests and the offline demo.

The architecture, the safetensors layout and the tokenizer are real (a byte-level BPE trained here
on a few built-in paragraphs, with llama-3 special tokens and chat template), so every code path that
loads, tokenizes and generates runs for real. The weights are random: what the model writes is noise.

A second kind, the scripted model (``genmlx.demo.scripted_model.write_scripted_model``), has
weights set so that it writes one given text: tool calls and thinking blocks, end to end.

The directory is written beside its destination and renamed into place, so a half-written demo model
never exists at the destination; the marker file ``genmlx-demo.json`` (written last) lists every file
with its sha256, which is how an existing directory is recognised as a complete demo model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from genmlx.core.errors import PermanentError

MARKER_FILE = "genmlx-demo.json"
VOCAB_SIZE_TARGET = 768
# Logit spread at the output: wide enough that greedy decoding never picks a zero-logit token and
# sampling at temperature 1 almost never does, narrow enough that the seed changes what is written.
OUTPUT_STD = 0.4

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN)

# Llama-3 layout; string content or a list of {"type": "text"} parts. Tools are offered Hermes-style
# (a <tools> list in a system turn, calls written as <tool_call>{json}</tool_call>), which mlx-lm's
# "json_tools" parser reads.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'You may call functions. Their signatures:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    '{{- \'</tools>\\nCall one as <tool_call>{"name": <name>, "arguments": <arguments object>}</tool_call>'
    "<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- elif message['content'] is none %}{%- set text = '' %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- set ns = namespace(calls='') %}"
    "{%- for tool_call in message.get('tool_calls') or [] %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}"
    '{%- set ns.calls = ns.calls + \'<tool_call>{"name": "\' + call.name + \'", "arguments": \''
    " + arguments + '}</tool_call>' %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- set text = '<tool_response>' + text + '</tool_response>' %}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + text | trim"
    " + ns.calls + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS = """\
The harbour town woke slowly. Fishing boats came back before the sun was high, and the people on the
quay sorted the catch into wooden boxes while gulls argued over what fell between the stones. A baker
opened his shutters, and the smell of warm bread drifted down the narrow street toward the water.

In the hills above the town there was an old observatory. Nobody had looked through its telescope for
years, but a student who liked to climb found the door unlocked one evening. She cleaned the lenses,
oiled the gears and waited for the clouds to part. When they did, the rings of a distant planet filled
the eyepiece, and she forgot that it was getting cold.

Computers follow instructions exactly, which is both their strength and their weakness. A program that
adds two numbers will add them a billion times without complaint, yet it cannot guess what you meant if
you wrote the wrong formula. Good engineers therefore write tests, read their code twice and ask a
colleague to read it a third time before they trust it with anything important.

A river carries water from the mountains to the sea, and along the way it shapes the land. It cuts
valleys, leaves sand on its banks and feeds the fields of farmers who plant wheat, barley and beans.
In spring the river is fast and loud; in late summer it is slow and clear enough to see the fish.

Language models predict the next word from the words that came before. A large one, trained on many
books, can write a letter, answer a question or summarise a report. A tiny one with random weights, like
this one, knows nothing at all: it strings together pieces of words, and what it writes is noise.

The library kept its rare maps in a quiet room at the end of a long corridor. Each map was stored flat
in a shallow drawer, and visitors had to wear gloves. One map showed a coastline that no longer exists,
drawn by a sailor who measured every bay with a knotted rope and a great deal of patience.

Cooking is chemistry you can eat. Heat changes sugar into caramel, turns egg white from clear to solid
and makes onions sweet. A good cook tastes as she goes, adds salt a little at a time and knows that the
same recipe behaves differently on a humid day than on a dry one.

Questions and answers, numbers and names: one, two, three, four, five, six, seven, eight, nine, ten.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. January, March, June and October.
"Hello," said the traveller. "Can you tell me the way to the station?" "Of course. Turn left, then right."
"""


@dataclass(frozen=True)
class ModelShape:
    """How wide and deep a random-weight llama is."""

    hidden_size: int
    layers: int
    attention_heads: int
    kv_heads: int
    intermediate_size: int
    context: int = 2048  # max_position_embeddings
    dtype: str = "float32"  # of the weights: an MLX dtype's name

    def describe(self) -> str:
        described = f"{self.layers} layers, hidden size {self.hidden_size}"
        return described if self.dtype == "float32" else f"{described}, {self.dtype}"


DEMO_SHAPE = ModelShape(hidden_size=64, layers=2, attention_heads=4, kv_heads=2, intermediate_size=128)
# About 40 M parameters: large enough that computing a token, not serving it, is most of its cost.
BENCHMARK_SHAPE = ModelShape(
    hidden_size=512, layers=12, attention_heads=8, kv_heads=4, intermediate_size=1536
)
# Llama 3.2 1B's and Llama 3.1 8B's layers (with this tokenizer's small vocabulary), for GPUs.
LLAMA_1B_SHAPE = ModelShape(
    hidden_size=2048,
    layers=16,
    attention_heads=32,
    kv_heads=8,
    intermediate_size=8192,
    context=131_072,
    dtype="bfloat16",
)
LLAMA_8B_SHAPE = ModelShape(
    hidden_size=4096,
    layers=32,
    attention_heads=32,
    kv_heads=8,
    intermediate_size=14336,
    context=131_072,
    dtype="bfloat16",
)


def write_demo_model(path: Path, *, seed: int = 0, shape: ModelShape = DEMO_SHAPE) -> Path:
    """Write the demo model at ``path`` (atomically) and return ``path``; ``shape`` makes it larger
    (for benchmarks), with the same tokenizer and the same kind of random weights.

    An existing complete demo model of that shape at ``path`` is returned as is; any other
    non-empty directory or file there raises ``PermanentError`` rather than being overwritten.
    """
    write_files = partial(_write_model_files, seed=seed, shape=shape)
    expected = {"weights": "random", "shape": _marker_shape(shape)}
    return write_model_atomically(Path(path), write_files, expected=expected)


def write_model_atomically(
    path: Path, write_files: Callable[[Path], None], expected: dict[str, str | None]
) -> Path:
    """Write a model with ``write_files`` into a staging directory beside ``path``, then rename it
    into place. An existing complete demo model there whose marker has the ``expected`` values is
    kept as is; anything else there raises ``PermanentError``."""
    if _occupied(path):
        return _existing_demo_model(path, expected)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is shared like any other
    try:
        write_files(staging)
        try:
            os.rename(staging, path)  # replaces an empty directory; fails on a non-empty one
        except OSError:
            # Someone else wrote something there meanwhile; theirs stands if it is a demo model.
            return _existing_demo_model(path, expected)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def is_demo_model(path: Path) -> bool:
    """Whether ``path`` holds a complete demo model: every file the marker lists, byte for byte."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
        files = marker["files"]
        return bool(files) and all(_sha256(path / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _occupied(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _existing_demo_model(path: Path, expected: dict[str, str | None]) -> Path:
    if is_demo_model(path):
        marker = json.loads((path / MARKER_FILE).read_text())
        if all(marker.get(key) == value for key, value in expected.items()):
            return path
        raise PermanentError(f"{path} holds a different GenMLX demo model: choose a new or empty directory")
    raise PermanentError(
        f"{path} exists and is not a complete GenMLX demo model: choose a new or empty directory"
    )


def _write_model_files(directory: Path, seed: int, shape: ModelShape = DEMO_SHAPE) -> None:
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab()
    special_ids = {token: vocab[token] for token in SPECIAL_TOKENS}
    config = model_config(tokenizer.get_vocab_size(), special_ids, shape)
    write_json(directory / "config.json", config)
    _write_weights(directory / "model.safetensors", config, seed, _quiet_token_ids(tokenizer))
    write_tokenizer_files(directory, tokenizer, tokenizer_config(special_ids))
    (directory / "README.md").write_text(_readme(seed, shape))
    marker_shape = _marker_shape(shape)
    write_marker(directory, seed, **({"shape": marker_shape} if marker_shape else {}))


def _marker_shape(shape: ModelShape) -> str | None:
    """What the marker says of ``shape``: nothing for the demo's own (as every demo model written
    before shapes existed)."""
    return None if shape == DEMO_SHAPE else shape.describe()


def write_tokenizer_files(directory: Path, tokenizer, tokenizer_config: dict) -> None:
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n")
    write_json(directory / "tokenizer_config.json", tokenizer_config)
    write_json(directory / "special_tokens_map.json", _special_tokens_map())


def train_tokenizer(corpus: str = CORPUS, vocab_size: int = VOCAB_SIZE_TARGET):
    """A byte-level BPE (GPT-2/llama-3 style) trained on ``corpus``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
    # Llama 3 adds BOS through the post-processor, so plain encode() of a prompt starts with it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A", pair=f"{BEGIN_OF_TEXT} $A $B", special_tokens=[(BEGIN_OF_TEXT, bos_id)]
    )
    return tokenizer


def _quiet_token_ids(tokenizer) -> list[int]:
    """Special tokens and tokens that do not decode to printable text (control characters, stray
    UTF-8 bytes): the model rarely writes them, so its noise at least reads as text."""
    quiet = []
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        printable = text.replace("\n", "").replace(" ", "").isprintable() and "\ufffd" not in text
        if text in SPECIAL_TOKENS or not text or not printable:
            quiet.append(token_id)
    return quiet


def model_config(vocab_size: int, special_ids: dict[str, int], shape: ModelShape = DEMO_SHAPE) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.attention_heads,
        "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": shape.context,
        "vocab_size": vocab_size,
        # Untied: with tied random embeddings the residual stream makes every token predict itself,
        # and greedy output would be one token repeated.
        "tie_word_embeddings": False,
        "bos_token_id": special_ids[BEGIN_OF_TEXT],
        "eos_token_id": [special_ids[END_OF_TEXT], special_ids[END_OF_TURN]],
        "torch_dtype": shape.dtype,
        "genmlx_demo": True,
    }


def _write_weights(path: Path, config: dict, seed: int, quiet_ids: list[int]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    head = mx.random.normal(model.lm_head.weight.shape, key=mx.random.key(seed)) * OUTPUT_STD
    # Zero logits: greedy decoding never picks these and sampling rarely does, so random weights
    # neither end every answer after a few tokens nor write control characters.
    head[mx.array(quiet_ids)] = 0.0
    model.lm_head.weight = head
    if config["torch_dtype"] != "float32":
        model.set_dtype(getattr(mx, config["torch_dtype"]))
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def tokenizer_config(special_ids: dict[str, int]) -> dict:
    added = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in sorted(special_ids.items(), key=lambda item: item[1])
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": END_OF_TURN,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "tool_parser_type": "json_tools",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
    }


def _special_tokens_map() -> dict:
    return {"bos_token": BEGIN_OF_TEXT, "eos_token": END_OF_TURN}


def _readme(seed: int, shape: ModelShape = DEMO_SHAPE) -> str:
    return (
        "# GenMLX demo model (random weights)\n\n"
        f"A {'tiny' if shape == DEMO_SHAPE else 'small'} llama ({shape.describe()}) written by `genmlx`"
        " for tests and offline demos.\n"
        f"Its weights are RANDOM (seed {seed}): the model knows nothing and everything it writes is noise.\n"
        "The architecture, file layout and tokenizer are real, so loading, tokenizing, chat templating\n"
        "and generation exercise the same code paths as a real model.\n"
    )


def write_marker(directory: Path, seed: int, **overrides: str) -> None:
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    marker = {
        "kind": "genmlx-demo-model",
        "architecture": "llama",
        "seed": seed,
        "weights": "random",
        "note": "The weights are random: the output of this model is noise.",
        "files": files,
        **overrides,
    }
    write_json(directory / MARKER_FILE, marker)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
