"""Kimi K3's XTML chat format: rendering (goldens written from the reference encoder's rules, spec §A5.3), per-segment
tokenisation, the K3 tokenizer (special tokens, stop token, format selection) and the reply parser (§A5.4).

The renderer was also checked byte-for-byte against llama.cpp's ``models/templates/Kimi-K3.jinja`` (a second reading
of ``encoding_k3.py``) on 168 conversation × option combinations; that template is not shipped here."""

import json

import pytest

from kimi_lm.chat import parse_reply
from kimi_lm.tokenizer import load_tokenizer
from kimi_lm.xtml import EFFORT_BODY, XtmlReplyParser, render, render_segments
from tiny_chat import CORPUS, TEMPLATE, train_bpe, write_k3_tokenizer, write_tokenizer

O, C, S, E = "<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>"
EFFORT_MAX = f'{O}message role="system" type="thinking-effort"{S}' + EFFORT_BODY.format("max") + f"{C}message{S}{E}"
HI = f'{O}message role="user"{S}hi{C}message{S}{E}'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALLS = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
         {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET", "n": 2}'}}]


# ---- rendering ----------------------------------------------------------------------------------------------------
def test_minimal_thinking_prompt():
    """The spec's example: thinking-effort message, the user turn, then the primed think channel."""
    assert render([{"role": "user", "content": "hi"}]) == EFFORT_MAX + HI + f'{O}message role="assistant"{S}{O}think{S}'


def test_thinking_off_and_effort():
    msgs = [{"role": "user", "content": "hi"}]
    assert render(msgs, thinking=False) == HI + f'{O}message role="assistant"{S}{O}response{S}'
    assert "`thinking_effort=low`" in render(msgs, thinking_effort="low")
    assert render(msgs, thinking_effort=None) == HI + f'{O}message role="assistant"{S}{O}think{S}'
    with pytest.raises(ValueError, match="thinking_effort"):
        render(msgs, thinking_effort="medium")  # advertised in the prompt text, refused by the reference encoder


def test_assistant_history_keeps_thinking_tools_and_results_in_call_order():
    msgs = [{"role": "system", "content": " Be brief. "},
            {"role": "user", "name": 'a"b&c', "content": [{"type": "text", "text": "Weather "}, {"type": "image"}]},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "need tools", "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},  # answered out of order
            {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            {"role": "assistant", "content": "Sunny.", "reasoning": "  "}]
    out = render(msgs, thinking_effort=None, add_generation_prompt=False)
    assert out == (
        f'{O}message role="system"{S} Be brief. {C}message{S}{E}'
        f'{O}message role="user" name="a&quot;b&amp;c"{S}Weather <|kimi_image_placeholder|>{C}message{S}{E}'
        f'{O}message role="assistant"{S}{O}think{S}need tools{C}think{S}{O}response{S}Checking.{C}response{S}'
        f'{O}tools{S}{O}call tool="get_weather" index="1"{S}'
        f'{O}argument key="city" type="string"{S}Paris{C}argument{S}{C}call{S}'
        f'{O}call tool="get_time" index="2"{S}{O}argument key="tz" type="string"{S}CET{C}argument{S}'
        f'{O}argument key="n" type="number"{S}2{C}argument{S}{C}call{S}{C}tools{S}{C}message{S}{E}'
        f'{O}message role="tool" tool="get_weather" index="1"{S}sunny{C}message{S}{E}'
        f'{O}message role="tool" tool="get_time" index="2"{S}12:00{C}message{S}{E}'
        f'{O}message role="assistant"{S}{O}think{S}{C}think{S}{O}response{S}Sunny.{C}response{S}{C}message{S}{E}')


def test_argument_types_and_raw_json_block():
    call = {"function": {"name": "f", "arguments": {"b": True, "z": None, "x": 1.5, "l": [1, "é"], "o": {"k": 1}}}}
    out = render([{"role": "assistant", "content": "", "tool_calls": [call]}], thinking=False,
                 add_generation_prompt=False)
    for key, kind, value in [("b", "boolean", "true"), ("z", "null", "null"), ("x", "number", "1.5"),
                             ("l", "array", '[1, "é"]'), ("o", "object", '{"k": 1}')]:
        assert f'{O}argument key="{key}" type="{kind}"{S}{value}{C}argument{S}' in out
    raw = {"function": {"name": "f", "arguments": "{not json"}}
    out = render([{"role": "assistant", "content": "", "tool_calls": [raw]}], thinking=False)
    assert f'{O}call tool="f" index="1"{S}{O}json type="object"{S}{{not json{C}json{S}{C}call{S}' in out
    with pytest.raises(ValueError, match="JSON object"):
        render([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}])


def test_tools_tool_choice_response_format_and_unresolved_results():
    msgs = [{"role": "assistant", "content": None, "tool_calls": CALLS[:1]},
            {"role": "tool", "content": "r"}, {"role": "tool", "name": "other", "content": "s"}]
    out = render(msgs, TOOLS, thinking=False, tool_choice="required",
                 response_format={"type": "json_schema", "json_schema": {"schema": {"b": 1, "a": {"d": 1, "c": 2}}}})
    declared = json.dumps(TOOLS, sort_keys=True, separators=(",", ":"))
    assert out.startswith(f'{O}message role="system" type="tool-declare"{S}# Tools\nHere are the available tools, '
                          f'described in JSONSchema.\n\n```json\n{declared}\n```{C}message{S}{E}')
    assert f'{O}message role="tool" tool="get_weather" index="1"{S}r' in out  # name from the i-th call
    assert f'{O}message role="tool" tool="other" index="2"{S}s' in out
    assert (f'type="tool-choice"{S}The system is invoked with `tool_choice=required`.\nYou MUST call tools in the '
            f'next message.{C}message{S}{E}') in out
    assert '```json\n{"a":{"c":2,"d":1},"b":1}\n```' in out and 'type="response-format"' in out
    dynamic = render([{"role": "system", "tools": TOOLS}], add_generation_prompt=False, thinking=False)
    assert dynamic.startswith(f'{O}message role="system" type="tool-declare"{S}## New Tools Available\n')


# ---- the K3 tokenizer ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks():
    return train_bpe(CORPUS, merges=60)


@pytest.fixture(scope="module")
def k3(tmp_path_factory, ranks):
    d = tmp_path_factory.mktemp("k3tok")
    write_k3_tokenizer(d, ranks)
    return load_tokenizer(d)


def test_k3_special_tokens_and_stop_token(k3):
    n = k3.num_base_tokens
    assert [k3.special_tokens[t] for t in (E, O, C, S)] == [n + 2, n + 3, n + 4, n + 5]
    assert k3.chat_format == "xtml" and k3.has_chat_format and k3.has_thinking
    assert k3.stop_token_ids == {n + 1, n + 2}  # [EOS] and <|end_of_msg|>
    assert k3.special_tokens["<|media_pad|>"] == n + 21


@pytest.mark.parametrize("how", ["config", "template", "names"])
def test_format_is_chosen_by_the_checkpoint_files(tmp_path, ranks, how):
    if how == "config":  # config.json model_type kimi_k3; the tokenizer config names nothing: K3's names are used
        n = write_k3_tokenizer(tmp_path, ranks, named=False, model_type="kimi_k3")
    elif how == "template":  # a Jinja template in the XTML format (llama.cpp ships one)
        n = write_k3_tokenizer(tmp_path, ranks)
        (tmp_path / "chat_template.jinja").write_text("{{ '<|open|>' }}<|end_of_msg|>")
    else:
        n = write_k3_tokenizer(tmp_path, ranks)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "xtml" and tok.special_tokens[O] == n + 3 and tok.end_of_msg_id == n + 2


def test_kimi_checkpoints_keep_their_format(tmp_path, ranks):
    write_tokenizer(tmp_path, ranks, TEMPLATE.read_text())
    (tmp_path / "config.json").write_text('{"model_type": "kimi_linear"}')
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "kimi" and O not in tok.special_tokens
    assert load_tokenizer(tmp_path, chat_template="kimi-k2-thinking").chat_template.startswith("{%- macro")


def test_tokenisation_is_per_segment(k3):
    msgs = [{"role": "user", "name": "bob", "content": "say <|open|> hi"}]
    ids = k3.apply_chat_template(msgs, tokenize=True)
    expected = []
    for text, special in render_segments(msgs):
        expected += [k3.special_tokens[text]] if special else k3.encode(text, allow_special_tokens=False)
    assert ids == expected
    assert k3.decode(ids) == k3.apply_chat_template(msgs)
    assert ids.count(k3.special_tokens[O]) == 4  # effort, user, assistant, think; not the one in the user's text
    # an attribute is four segments: ` name`, `="`, the value, `"`
    attr = k3.encode(" name", False) + k3.encode('="', False) + k3.encode("bob", False) + k3.encode('"', False)
    assert any(ids[i : i + len(attr)] == attr for i in range(len(ids)))


# ---- parsing replies ----------------------------------------------------------------------------------------------
REPLY = (f"Let me look.{C}think{S}{O}response{S}Checking.{C}response{S}{O}tools{S}"
         f'{O}call tool="get_weather" index="1"{S}{O}argument key="city" type="string"{S}Paris{C}argument{S}'
         f'{O}argument key="days" type="number"{S}3{C}argument{S}{C}call{S}'
         f'{O}call tool="say&quot;hi" index="2"{S}{O}json type="object"{S}{{"a": [1]}}{C}json{S}{C}call{S}'
         f"{C}tools{S}{C}message{S}")


def _feed(text, pieces, clean=True, **kw):
    parser, whole, pos, i = XtmlReplyParser(**kw), None, 0, 0
    while pos < len(text):
        d = parser.feed(text[pos : pos + pieces[i % len(pieces)]])
        assert not clean or (O not in d.content + d.reasoning and C not in d.content + d.reasoning)
        pos, i = pos + pieces[i % len(pieces)], i + 1
        whole = d if whole is None else whole.__iadd__(d)
    whole += parser.finish()
    return whole


@pytest.mark.parametrize("pieces", [[10_000], [1], [3, 7], [5]])
def test_reply_splits_however_the_text_arrives(pieces):
    d = _feed(REPLY, pieces, first_index=2)
    assert (d.reasoning, d.content, d.invalid_calls) == ("Let me look.", "Checking.", [])
    assert [(c.id, c.name, c.parsed) for c in d.tool_calls] == [
        ("functions.get_weather:2", "get_weather", {"city": "Paris", "days": 3}),
        ('functions.say"hi:3', 'say"hi', {"a": [1]})]
    assert json.loads(d.tool_calls[0].arguments) == {"city": "Paris", "days": 3}


def test_reasoning_edge_cases():
    assert _feed("all thinking, no close", [4]).reasoning == "all thinking, no close"
    d = _feed(f"think{O}tools{S}{O}call tool=\"f\"{S}{C}call{S}{C}tools{S}", [3])  # tools without closing think
    assert d.reasoning == "think" and [c.name for c in d.tool_calls] == ["f"]
    d = _feed(f"answer{C}response{S}{C}message{S}", [2], in_reasoning=False)  # thinking off: prompt opened response
    assert (d.reasoning, d.content) == ("", "answer")


def test_malformed_calls_are_content_and_reported():
    bad = f'{O}call index="1"{S}{O}argument key="a"{S}1{C}argument{S}{C}call{S}'  # no tool name
    d = _feed(f"r{C}think{S}{O}response{S}ok{C}response{S}{O}tools{S}{bad}{C}tools{S}", [4], clean=False)
    assert d.content == "ok" + bad and d.tool_calls == []
    assert [c.error for c in d.invalid_calls] == ["tool call without a tool name"]
    cut = f'{O}call tool="f"{S}{O}argument key="a"{S}1'
    d = _feed(f"r{C}think{S}{O}tools{S}{cut}", [5], clean=False)  # the reply stopped inside a call
    assert d.content == cut and "unterminated" in d.invalid_calls[0].error


def test_parse_reply_uses_the_tokenizer_format(k3):
    prompt = k3.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    message = parse_reply(k3, REPLY, prompt)
    assert message["reasoning_content"] == "Let me look." and message["content"] == "Checking."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", 'say"hi']
    off = k3.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, thinking=False)
    assert parse_reply(k3, f"plain{C}response{S}", off) == {"role": "assistant", "content": "plain"}
