"""Chat template rendering (golden: transformers' own rendering of the same template: Kimi Linear's and the official
K2-Thinking template kimi-lm ships) and Kimi tool-call / reasoning parsing."""

import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from kimi_lm.chat import (ToolCallParser, builtin_template, count_tool_calls, deep_sort_dict, parse_assistant_message,
                          render_chat_template)
from tiny_chat import TEMPLATE

KIMI = TEMPLATE.read_text()
K2_THINKING = builtin_template("kimi-k2-thinking")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {"unit": {"type": "string"},
                                                                          "city": {"type": "string"}}}}}]
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks  \n  bye"}],
    "tool_call_and_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."}],
    "dict_arguments_no_content": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}},
            {**CALL, "id": "functions.get_weather:1", "function": {"name": "get_weather", "arguments": "{}"}}]}],
    "named_and_list_content": [
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                                      {"type": "text", "text": "ok?"}]}],
    "unicode": [{"role": "user", "content": "漢字 🦊 \"quotes\" <b>html</b>"}],
}


def _golden(messages, tools=None, add_generation_prompt=True, template=KIMI):
    # the official tokenizer sorts tool keys recursively, then calls transformers' apply_chat_template
    rendered, _ = render_jinja_template([messages], tools=deep_sort_dict(tools) if tools else None,
                                        chat_template=template, add_generation_prompt=add_generation_prompt)
    return rendered[0]


def test_the_spec_example_byte_for_byte():
    out = render_chat_template(KIMI, CONVERSATIONS["system_user"])
    assert out == ("<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"
                   "<|im_assistant|>assistant<|im_middle|>")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    out = render_chat_template(KIMI, messages, add_generation_prompt=add_generation_prompt)
    assert out == _golden(messages, add_generation_prompt=add_generation_prompt)


def test_tools_are_declared_with_sorted_keys_compact_json():
    out = render_chat_template(KIMI, CONVERSATIONS["system_user"], tools=TOOLS)
    assert out == _golden(CONVERSATIONS["system_user"], tools=TOOLS)
    declared = out[len("<|im_system|>tool_declare<|im_middle|>") : out.index("<|im_end|>")]
    assert declared == json.dumps(deep_sort_dict(TOOLS), separators=(",", ":"), ensure_ascii=False)
    assert declared.index('"city"') < declared.index('"unit"')  # sorted, though given unit-first


def test_tool_call_rendering_is_the_documented_format():
    out = render_chat_template(KIMI, CONVERSATIONS["tool_call_and_result"], add_generation_prompt=False)
    assert ("<|im_assistant|>assistant<|im_middle|>Let me check.<|tool_calls_section_begin|><|tool_call_begin|>"
            'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
            "<|tool_calls_section_end|><|im_end|>") in out
    assert '<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n{"temp": 21}<|im_end|>' in out


def test_template_runs_in_a_sandbox():
    with pytest.raises(ValueError, match="chat template"):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])


def test_non_json_objects_never_reach_the_template():
    class Sneaky:
        def __str__(self):
            return "leak"

    out = render_chat_template("{{ messages[0].content }}", [{"role": "user", "content": Sneaky()}])
    assert out == "<Sneaky>"


# ---- tool-call parsing -------------------------------------------------------------------------------------------
SECTION = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
           '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>'
           '{"tz": "CET"}<|tool_call_end|><|tool_calls_section_end|>')


def _parse_stream(text, pieces, invalid=None, **kw):
    """Feed ``text`` cut into pieces of the given sizes (cycled); collect content and calls (and, into the list
    ``invalid``, the calls that could not be read)."""
    parser = ToolCallParser(**kw)
    content, reasoning, calls, deltas, pos, i = "", "", [], [], 0, 0
    while pos < len(text):
        size = pieces[i % len(pieces)]
        d = parser.feed(text[pos : pos + size])
        pos, i = pos + size, i + 1
        deltas.append(d.content)
        content, reasoning, calls = content + d.content, reasoning + d.reasoning, calls + d.tool_calls
        if invalid is not None:
            invalid += d.invalid_calls
    d = parser.finish()
    deltas.append(d.content)
    if invalid is not None:
        invalid += d.invalid_calls
    return content + d.content, reasoning + d.reasoning, calls + d.tool_calls, deltas


@pytest.mark.parametrize("pieces", [[10_000], [1], [3, 1, 7], [5]])
def test_section_parses_the_same_however_the_text_is_split(pieces):
    content, _, calls, deltas = _parse_stream("Checking both." + SECTION + " Done.", pieces)
    assert content == "Checking both. Done."
    assert all("<|" not in d and "|>" not in d for d in deltas)  # marker text never leaks, even split
    assert [(c.id, c.name, c.parsed, c.error) for c in calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"}, None),
        ("functions.get_time:1", "get_time", {"tz": "CET"}, None)]


def test_singular_section_spelling():
    text = SECTION.replace("tool_calls_section", "tool_call_section")
    content, _, calls, _ = _parse_stream(text, [2])
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]


def test_section_inside_unclosed_think_ends_reasoning():
    text = "<think>I should call the tool" + SECTION
    content, reasoning, calls, _ = _parse_stream(text, [4], thinking=True)
    assert reasoning == "I should call the tool" and content == ""
    assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]


def test_think_is_separated_only_when_the_template_uses_it():
    text = "<think>hmm</think>Answer"
    assert _parse_stream(text, [3], thinking=True)[:2] == ("Answer", "hmm")
    assert _parse_stream(text, [3], thinking=False)[:2] == (text, "")


def test_non_canonical_ids_get_the_global_index():
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>get_weather:0<|tool_call_argument_begin|>{}"
            "<|tool_call_end|><|tool_call_begin|> lookup <|tool_call_argument_begin|>{}<|tool_call_end|>"
            "<|tool_calls_section_end|>")
    _, _, calls, _ = _parse_stream(text, [7], first_index=3)
    assert [c.id for c in calls] == ["functions.get_weather:3", "functions.lookup:4"]


BAD_CALL = ('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": Paris}'
            '<|tool_call_end|>')


@pytest.mark.parametrize("pieces", [[10_000], [1], [6]])
def test_invalid_json_stays_in_content_and_is_reported(pieces):
    """A call that cannot be read is never dropped: its text (markers included) is content, where it stood."""
    text = "Sure." + SECTION.replace('{"city": "Paris"}', '{"city": Paris}') + " ok"
    invalid = []
    content, _, calls, _ = _parse_stream(text, pieces, invalid)
    assert content == "Sure." + BAD_CALL + " ok"
    assert [(c.id, c.parsed, c.error) for c in calls] == [("functions.get_time:1", {"tz": "CET"}, None)]
    assert len(invalid) == 1 and invalid[0].error.startswith("invalid JSON arguments") and invalid[0].raw == BAD_CALL
    message = parse_assistant_message(text)
    assert [c["id"] for c in message["tool_calls"]] == ["functions.get_time:1"]
    assert message["tool_call_errors"][0]["id"] == "functions.get_weather:0"
    assert message["content"] == content


def test_unterminated_call_is_reported_and_kept():
    invalid = []
    content, _, calls, _ = _parse_stream(SECTION[:120], [9], invalid)
    assert calls == [] and len(invalid) == 1 and "unterminated" in invalid[0].error
    assert content == SECTION[len("<|tool_calls_section_begin|>") : 120]


def test_only_a_malformed_call_gives_content_not_an_empty_reply():
    text = "<|tool_calls_section_begin|>" + BAD_CALL + "<|tool_calls_section_end|>"
    message = parse_assistant_message(text)
    assert message["content"] == BAD_CALL and "tool_calls" not in message


def test_stray_markers_never_reach_content():
    text = "a<|tool_call_end|>b<|tool_calls_section_end|>c<|tool_call_argument_begin|>d</think>e"
    content, reasoning, calls, _ = _parse_stream(text, [3], thinking=True)
    assert (content, reasoning, calls) == ("abcde", "", [])


def test_text_that_only_looks_like_a_marker_is_kept():
    text = "a <|tool or <|im and <|tool_calls_sect"
    content, _, calls, _ = _parse_stream(text, [1])
    assert content == text and calls == []


@pytest.mark.parametrize("pieces", [[10_000], [1], [4]])
def test_tool_calls_after_thinking(pieces):
    content, reasoning, calls, _ = _parse_stream("<think>Need the weather.</think>Checking." + SECTION, pieces,
                                                 thinking=True)
    assert (reasoning, content) == ("Need the weather.", "Checking.")
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    # the prompt already opened <think> (K2.5-style templates): reasoning from the first token
    content, reasoning, calls, _ = _parse_stream("hmm</think>" + SECTION, pieces, thinking=True, in_reasoning=True)
    assert (reasoning, content, len(calls)) == ("hmm", "", 2)


def test_parsed_message_renders_back_with_the_same_ids():
    message = parse_assistant_message("Sure." + SECTION, first_index=0)
    assert message["content"] == "Sure."
    history = [{"role": "user", "content": "?"}, message]
    assert count_tool_calls(history) == 2
    out = render_chat_template(KIMI, history, add_generation_prompt=False)
    assert out.endswith("<|im_assistant|>assistant<|im_middle|>Sure." + SECTION + "<|im_end|>")


# ---- the official K2-Thinking template (kimi_lm/templates/kimi-k2-thinking.jinja) ------------------------------------
THINKING_CONVERSATIONS = {
    "first_turn": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "history_thinking_dropped": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "add again"},
        {"role": "user", "content": "thanks"}],
    "tool_loop_keeps_thinking": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "need a tool", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 21}'}],
    "named_list_content_dict_args": [
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}]},
        {"role": "assistant", "content": None, "reasoning": "r", "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
}


@pytest.mark.parametrize("name", sorted(THINKING_CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_k2_thinking_matches_transformers(name, add_generation_prompt, tools):
    messages = THINKING_CONVERSATIONS[name]
    out = render_chat_template(K2_THINKING, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    # transformers sees the reasoning under the name the template reads, as our renderer aliases it
    aliased = [{**m, "reasoning_content": m["reasoning"]} if "reasoning" in m else m for m in messages]
    assert out == _golden(aliased, tools=tools, add_generation_prompt=add_generation_prompt, template=K2_THINKING)


def test_k2_thinking_drops_thinking_before_the_last_plain_answer_only():
    out = render_chat_template(K2_THINKING, THINKING_CONVERSATIONS["tool_loop_keeps_thinking"])
    assert out == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>"  # history: reasoning dropped
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>need a tool</think>Checking."  # the tool loop: kept
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        '<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n{"temp": 21}<|im_end|>'
        "<|im_assistant|>assistant<|im_middle|>")


def test_builtin_template_is_the_official_file():
    import hashlib

    # byte-for-byte the hub file (llama.cpp's copy models/templates/moonshotai-Kimi-K2-Thinking.jinja, 0c3c896e)
    assert hashlib.sha256(K2_THINKING.encode()).hexdigest() == (
        "833d0c375531149a922a0f2addf9a66cce8e4503c500fe4ca6a95e9d1ed3c75a")
    with pytest.raises(ValueError, match="kimi-k2-thinking"):
        builtin_template("nope")
