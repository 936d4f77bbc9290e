"""The scripted demo model: real weights that make a real llama write a given text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler

from genmlx.core.errors import PermanentError
from genmlx.demo.random_model import is_demo_model, write_demo_model
from genmlx.demo.scripted_model import write_scripted_model
from genmlx.dispatcher.api.reply_parsing import prompt_opens_reasoning

# Thinking, then a Hermes tool call: each of its tokens is followed by one and the same token.
TOOL_REPLY = (
    "<think>The user wants the weather in Paris.</think>"
    '<tool_call>{"name": "get_weather","arguments":{"city":"Paris"}}</tool_call>'
)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory):
    path = write_scripted_model(tmp_path_factory.mktemp("models") / "scripted", TOOL_REPLY)
    return path, *load(str(path))


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


@pytest.mark.parametrize("question", ["What is the weather?", "Tell me about rivers.", "x"])
def test_greedy_decoding_writes_the_text_after_any_chat_prompt(scripted, question: str) -> None:
    _, model, tokenizer = scripted
    assert generate(model, tokenizer, chat_prompt(tokenizer, question), max_tokens=80) == TOOL_REPLY


def test_sampling_at_temperature_one_writes_it_too(scripted) -> None:
    _, model, tokenizer = scripted
    sampler = make_sampler(temp=1.0)
    assert generate(model, tokenizer, "Once upon a time", max_tokens=80, sampler=sampler) == TOOL_REPLY


def test_it_ends_its_turn_after_the_text(scripted) -> None:
    _, model, tokenizer = scripted
    # Room for far more tokens than the text has: generation must stop at end-of-turn by itself.
    reply = generate(model, tokenizer, chat_prompt(tokenizer, "hi"), max_tokens=500)
    assert reply == TOOL_REPLY


def test_the_tokenizer_names_the_hermes_parser_and_thinking_markers(scripted) -> None:
    path, _, tokenizer = scripted
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    assert tokenizer.tool_call_start == "<tool_call>" and tokenizer.tool_call_end == "</tool_call>"
    body = TOOL_REPLY.split("<tool_call>")[1].removesuffix("</tool_call>")
    assert tokenizer.tool_parser(body, None) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert is_demo_model(path)
    assert json.loads((path / "genmlx-demo.json").read_text())["text"] == TOOL_REPLY


def test_a_text_a_bigram_chain_cannot_write_is_refused(tmp_path: Path) -> None:
    # " a" is followed by " dog" once and " cow" once: the previous token alone cannot choose.
    with pytest.raises(ValueError, match="followed by two different tokens"):
        write_scripted_model(tmp_path / "ambiguous", "a cat and a dog and a cow")
    assert not (tmp_path / "ambiguous").exists()


def demo_model_command(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "genmlx", "demo-model", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_the_cli_writes_a_scripted_model_and_refuses_a_text_it_cannot_write(tmp_path: Path) -> None:
    done = demo_model_command(str(tmp_path / "hello"), "--scripted", "Hello from the CLI.")
    assert done.returncode == 0, done.stderr
    assert "scripted" in done.stdout
    path = tmp_path / "hello"
    assert is_demo_model(path) and json.loads((path / "genmlx-demo.json").read_text())["text"] == (
        "Hello from the CLI."
    )
    model, tokenizer = load(str(path))
    assert generate(model, tokenizer, chat_prompt(tokenizer, "hi"), max_tokens=20) == "Hello from the CLI."

    refused = demo_model_command(str(tmp_path / "ambiguous"), "--scripted", "a cat and a dog and a cow")
    assert refused.returncode == 2
    assert refused.stderr.startswith("genmlx: --scripted: cannot write a model for this text: token")
    assert "followed by two different tokens" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "ambiguous").exists()


def test_an_existing_model_is_kept_only_if_it_writes_the_same_text(scripted, tmp_path: Path) -> None:
    path = scripted[0]
    assert write_scripted_model(path, TOOL_REPLY) == path
    with pytest.raises(PermanentError, match="different GenMLX demo model"):
        write_scripted_model(path, "Something else entirely.")
    with pytest.raises(PermanentError, match="different GenMLX demo model"):
        write_demo_model(path)


def test_a_prompt_ending_inside_a_thinking_block_is_seen_as_opening_reasoning(scripted) -> None:
    _, _, tokenizer = scripted
    opened = tokenizer.encode(chat_prompt(tokenizer, "hi") + "<think>\n", add_special_tokens=False)
    closed = tokenizer.encode(
        chat_prompt(tokenizer, "hi") + "<think>\n</think>\n\n", add_special_tokens=False
    )
    assert prompt_opens_reasoning(tokenizer, tuple(opened))
    assert not prompt_opens_reasoning(tokenizer, tuple(closed))
    assert not prompt_opens_reasoning(tokenizer, tuple(tokenizer.encode(chat_prompt(tokenizer, "hi"))))


# A shell tool call, then, once its result is in the conversation, a plain answer.
SHELL_CALL = '<tool_call>{"name": "Bash","arguments":{"command":"touch ran.txt"}}</tool_call>'
ANSWER_AFTER_TOOL = "Done, the file is there"
TOOLS = [{"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def two_scripts(tmp_path_factory: pytest.TempPathFactory):
    path = write_scripted_model(
        tmp_path_factory.mktemp("models") / "two", SHELL_CALL, after_tool=ANSWER_AFTER_TOOL
    )
    return path, *load(str(path))


def conversation_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)


def with_tool_result(question: str, result: str) -> list[dict]:
    call = {"function": {"name": "Bash", "arguments": {"command": "touch ran.txt"}}}
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result},
    ]


@pytest.mark.parametrize("question", ["Make the file.", "x " * 2000])
def test_without_a_tool_result_it_writes_the_first_text(two_scripts, question: str) -> None:
    _, model, tokenizer = two_scripts
    prompt = conversation_prompt(tokenizer, [{"role": "user", "content": question}])
    assert generate(model, tokenizer, prompt, max_tokens=80) == SHELL_CALL
    assert generate(model, tokenizer, prompt, max_tokens=80, sampler=make_sampler(temp=1.0)) == SHELL_CALL


@pytest.mark.parametrize(("question", "result"), [("Make the file.", ""), ("x " * 2000, "ok " * 3000)])
def test_after_a_tool_result_it_writes_the_second_text_and_ends(two_scripts, question, result) -> None:
    _, model, tokenizer = two_scripts
    prompt = conversation_prompt(tokenizer, with_tool_result(question, result))
    assert tokenizer.encode(prompt).count(tokenizer.convert_tokens_to_ids("<tool_response>")) == 1
    assert generate(model, tokenizer, prompt, max_tokens=500) == ANSWER_AFTER_TOOL
    sampler = make_sampler(temp=1.0)
    assert generate(model, tokenizer, prompt, max_tokens=80, sampler=sampler) == ANSWER_AFTER_TOOL


def test_a_later_user_turn_still_follows_the_tool_result(two_scripts) -> None:
    _, model, tokenizer = two_scripts
    messages = [
        *with_tool_result("Make the file.", ""),
        {"role": "assistant", "content": ANSWER_AFTER_TOOL},
        {"role": "user", "content": "Thanks."},
    ]
    assert generate(model, tokenizer, conversation_prompt(tokenizer, messages), max_tokens=80) == (
        ANSWER_AFTER_TOOL
    )


def test_the_marker_records_both_texts_and_a_one_text_model_is_not_taken_for_it(two_scripts) -> None:
    path = two_scripts[0]
    marker = json.loads((path / "genmlx-demo.json").read_text())
    assert (marker["text"], marker["after_tool"]) == (SHELL_CALL, ANSWER_AFTER_TOOL)
    assert write_scripted_model(path, SHELL_CALL, after_tool=ANSWER_AFTER_TOOL) == path
    with pytest.raises(PermanentError, match="different GenMLX demo model"):
        write_scripted_model(path, SHELL_CALL)


def test_texts_that_disagree_on_a_successor_are_refused(tmp_path: Path) -> None:
    # "." ends the first text's file name and the second text: two successors.
    with pytest.raises(ValueError, match="followed by two different tokens"):
        write_scripted_model(tmp_path / "clash", "touch ran.txt", after_tool="It ran.")


@pytest.mark.e2e
def test_the_cli_writes_a_model_with_a_text_for_after_a_tool_result(tmp_path: Path) -> None:
    done = demo_model_command(str(tmp_path / "two"), "--scripted", SHELL_CALL, "--after-tool", "All done")
    assert done.returncode == 0, done.stderr
    model, tokenizer = load(str(tmp_path / "two"))
    prompt = conversation_prompt(tokenizer, with_tool_result("Make the file.", ""))
    assert generate(model, tokenizer, prompt, max_tokens=20) == "All done"

    alone = demo_model_command(str(tmp_path / "alone"), "--after-tool", "All done")
    assert alone.returncode == 2 and "--after-tool needs --scripted" in alone.stderr
