"""Chat template rendering (golden: transformers' own rendering of the same template) and Kimi tool-call parsing."""

import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from kimi_lm.chat import (ToolCallParser, count_tool_calls, deep_sort_dict, parse_assistant_message,
                          render_chat_template)
from tiny_chat import TEMPLATE

KIMI = TEMPLATE.read_text()
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


def _golden(messages, tools=None, add_generation_prompt=True):
    # the official tokenizer sorts tool keys recursively, then calls transformers' apply_chat_template
    rendered, _ = render_jinja_template([messages], tools=deep_sort_dict(tools) if tools else None, chat_template=KIMI,
                                        add_generation_prompt=add_generation_prompt)
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


def _parse_stream(text, pieces, **kw):
    """Feed ``text`` cut into pieces of the given sizes (cycled); collect content and calls."""
    parser = ToolCallParser(**kw)
    content, reasoning, calls, deltas, pos, i = "", "", [], [], 0, 0
    while pos < len(text):
        size = pieces[i % len(pieces)]
        d = parser.feed(text[pos : pos + size])
        pos, i = pos + size, i + 1
        deltas.append(d.content)
        content, reasoning, calls = content + d.content, reasoning + d.reasoning, calls + d.tool_calls
    d = parser.finish()
    deltas.append(d.content)
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


def test_invalid_json_is_reported_not_raised():
    text = SECTION.replace('{"city": "Paris"}', '{"city": Paris}')
    _, _, calls, _ = _parse_stream(text, [6])
    assert calls[0].parsed is None and calls[0].error.startswith("invalid JSON arguments")
    assert calls[1].error is None
    message = parse_assistant_message(text)
    assert [c["id"] for c in message["tool_calls"]] == ["functions.get_time:1"]
    assert message["tool_call_errors"][0]["id"] == "functions.get_weather:0"


def test_unterminated_call_is_reported():
    _, _, calls, _ = _parse_stream(SECTION[:120], [9])
    assert len(calls) == 1 and "unterminated" in calls[0].error


def test_stray_markers_never_reach_content():
    text = "a<|tool_call_end|>b<|tool_calls_section_end|>c<|tool_call_argument_begin|>d</think>e"
    content, reasoning, calls, _ = _parse_stream(text, [3], thinking=True)
    assert (content, reasoning, calls) == ("abcde", "", [])


def test_text_that_only_looks_like_a_marker_is_kept():
    text = "a <|tool or <|im and <|tool_calls_sect"
    content, _, calls, _ = _parse_stream(text, [1])
    assert content == text and calls == []


def test_parsed_message_renders_back_with_the_same_ids():
    message = parse_assistant_message("Sure." + SECTION, first_index=0)
    assert message["content"] == "Sure."
    history = [{"role": "user", "content": "?"}, message]
    assert count_tool_calls(history) == 2
    out = render_chat_template(KIMI, history, add_generation_prompt=False)
    assert out.endswith("<|im_assistant|>assistant<|im_middle|>Sure." + SECTION + "<|im_end|>")
