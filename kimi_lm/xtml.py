"""Kimi K3's chat format "XTML": rendering a conversation, and reading reasoning, content and tool calls back out.

K3 ships no Jinja template; its ``encoding_k3.py`` renders messages in Python, and so does this module (spec
``shared/specs/kimi_k3_and_int4.md`` §A5). The markup is made of three control tokens::

    <|open|>message role="user"<|sep|>hi<|close|>message<|sep|><|end_of_msg|>

An assistant message holds a ``think`` channel (thinking mode only; present even when empty), a ``response`` channel
and an optional ``tools`` section of ``call`` elements whose arguments are typed ``argument`` elements (or one raw
``json`` block). Notable rules, each from the reference encoder:

* **Tokenisation is per segment**: control tokens are special ids; every other piece (tag name, each attribute's
  `` key``, ``="``, escaped value and ``"``, message text) is BPE-encoded on its own with special-token strings
  left as text. :func:`render_segments` returns those pieces; the text form is their concatenation.
* Order: tool declarations, the ``thinking_effort`` message (on by default: ``thinking=True``,
  ``thinking_effort="max"``), the messages, ``tool_choice`` and ``response_format`` notes, the generation prompt
  (which opens ``think``, or ``response`` when thinking is off).
* Tool results carry ``tool="NAME" index="i"`` (1-based, reset at each assistant message); a run of results is put
  back into call order by ``tool_call_id`` when every one of them resolves.

:class:`XtmlReplyParser` is the streaming reader (reasoning parser + tool parser of vLLM's ``kimi_k3``), with the
same interface and :class:`~kimi_lm.chat.ChatDelta` output as :class:`~kimi_lm.chat.ToolCallParser`.
References: vLLM ``tokenizers/encoding_k3.py``, ``reasoning/kimi_k3_reasoning_parser.py``,
``tool_parsers/kimi_k3_tool_parser.py``; llama.cpp ``models/templates/Kimi-K3.jinja`` (a second reading).
"""

from __future__ import annotations

import json
import re

from kimi_lm.chat import ChatDelta, ToolCall, _plain, partial_suffix_len

OPEN, CLOSE, SEP, END_OF_MSG = "<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>"
SPECIAL_TOKENS = {  # offset from the first special id -> name (spec §A5.1)
    0: "[BOS]", 1: "[EOS]", 2: END_OF_MSG, 3: OPEN, 4: CLOSE, 5: SEP, 6: "[start_header_id]", 7: "[end_header_id]",
    9: "[EOT]", 18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>", 21: "<|media_pad|>",
    254: "[UNK]", 255: "[PAD]",
}
THINKING_EFFORTS = ("low", "high", "max")  # the reference encoder raises on anything else ("medium" included)
IMAGE_PLACEHOLDER = "<|kimi_image_placeholder|>"

TOOLS_BODY = "# Tools\nHere are the available tools, described in JSONSchema.\n\n```json\n{}\n```"
DYNAMIC_TOOLS_BODY = ("## New Tools Available\nThe system dynamically extends the toolset via lazy-loading.\n"
                      "You have access to all existing and extended tools.\nHere are the specs for the extended "
                      "tools.\n\n```json\n{}\n```")
EFFORT_BODY = ("`thinking_effort` guides on how much to think in your thinking channel (not including the response "
               "channel), supported values include `low`, `medium`, `high`, and `max`.\nNow the system is invoked "
               "with `thinking_effort={}`.")
CHOICE_BODY = {"required": "The system is invoked with `tool_choice=required`.\nYou MUST call tools in the next "
                           "message.",
               "none": "The system is invoked with `tool_choice=none`.\nYou MUST NOT call any tools in the next "
                       "message."}
_RAW_JSON = ("Your response must be raw JSON data without markdown code blocks (```json) or any additional "
             "formatting.")
JSON_OBJECT_BODY = "The system is invoked with `response_format=json_object`.\n" + _RAW_JSON
JSON_SCHEMA_BODY = ("The system is invoked with `response_format=json_schema`.\n" + _RAW_JSON +
                    "\nThe JSON data must match the following schema:\n```json\n{}\n```")

Segment = tuple[str, bool]  # (text, is a control token)


def sorted_json(value) -> str:
    """Keys sorted recursively, compact separators, non-ASCII kept (the reference's JSON for tools and schemas)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _escape(value) -> str:
    return str(value).replace("&", "&amp;").replace('"', "&quot;")


def _unescape(value: str) -> str:
    return value.replace("&quot;", '"').replace("&amp;", "&")


class _Writer:
    def __init__(self):
        self.segments: list[Segment] = []

    def text(self, s: str) -> None:
        if s:
            self.segments.append((s, False))

    def special(self, s: str) -> None:
        self.segments.append((s, True))

    def open(self, tag: str, *attrs: tuple[str, object]) -> None:
        self.special(OPEN)
        self.text(tag)
        for key, value in attrs:  # four segments per attribute, as the reference encoder tokenises them
            self.text(f" {key}")
            self.text('="')
            self.text(_escape(value))
            self.text('"')
        self.special(SEP)

    def close(self, tag: str) -> None:
        self.special(CLOSE)
        self.text(tag)
        self.special(SEP)

    def message(self, attrs: list[tuple[str, object]], body) -> None:
        self.open("message", *attrs)
        body() if callable(body) else self.text(body)
        self.close("message")
        self.special(END_OF_MSG)

    def internal(self, kind: str, body: str) -> None:
        self.message([("role", "system"), ("type", kind)], body.strip())


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            parts.append(IMAGE_PLACEHOLDER)
        elif isinstance(part, dict):
            parts.append(str(part.get("text") or ""))
    return "".join(parts)


def _value_type(value) -> str:
    if isinstance(value, bool):  # before number: bool is an int in Python
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array"


def _call_function(call: dict) -> dict:
    fn = call.get("function")
    return fn if isinstance(fn, dict) else call


def _write_call(w: _Writer, call: dict, index: int) -> None:
    fn = _call_function(call)
    if not fn.get("name"):
        raise ValueError("a tool call needs a function name")
    w.open("call", ("tool", fn["name"]), ("index", index))
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:  # text that is not JSON goes back as the raw block the model wrote
            w.open("json", ("type", "object"))
            w.text(arguments)
            w.close("json")
            w.close("call")
            return
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {fn['name']!r}: arguments must be a JSON object, got "
                         f"{type(arguments).__name__}")
    for key, value in arguments.items():
        w.open("argument", ("key", key), ("type", _value_type(value)))
        w.text(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        w.close("argument")
    w.close("call")


def _write_assistant(w: _Writer, m: dict, thinking: bool) -> None:
    if thinking:  # the channel is always there in thinking mode, even empty; history keeps its reasoning
        reasoning = m.get("reasoning_content") or m.get("reasoning") or ""
        w.open("think")
        if str(reasoning).strip():
            w.text(str(reasoning))
        w.close("think")
    w.open("response")
    w.text(_content_text(m.get("content")))
    w.close("response")
    calls = m.get("tool_calls") or []
    if calls:
        w.open("tools")
        for i, call in enumerate(calls, 1):
            _write_call(w, call, i)
        w.close("tools")


def _tool_runs(messages: list[dict]):
    """Messages with each run of tool results re-sorted into call order when every result resolves by id."""
    out, calls, i = [], [], 0
    while i < len(messages):
        m = messages[i]
        if m.get("role") != "tool":
            if m.get("role") == "assistant":
                calls = m.get("tool_calls") or []
            out.append((m, calls))
            i += 1
            continue
        j = i
        while j < len(messages) and messages[j].get("role") == "tool":
            j += 1
        run = messages[i:j]
        order = {str(c.get("id")): k for k, c in enumerate(calls) if c.get("id") is not None}
        keys = [order.get(str(t.get("tool_call_id", t.get("id")))) for t in run]
        if run and all(k is not None for k in keys):
            run = [t for _, t in sorted(zip(keys, run), key=lambda kt: kt[0])]
        out.extend((t, calls) for t in run)
        i = j
    return out


def render_segments(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    thinking: bool = True, thinking_effort: str | None = "max", tool_choice=None,
                    response_format=None, **_ignored) -> list[Segment]:
    """The conversation as XTML segments (text, is_special), exactly as K3's reference encoder builds them."""
    messages = _plain(messages)
    if thinking and thinking_effort is not None and thinking_effort not in THINKING_EFFORTS:
        raise ValueError(f"unsupported thinking_effort={thinking_effort!r}; Kimi K3 supports "
                         f"{', '.join(THINKING_EFFORTS)}")
    w = _Writer()
    if tools:
        w.internal("tool-declare", TOOLS_BODY.format(sorted_json(_plain(tools))))
    if thinking and thinking_effort is not None:
        w.internal("thinking-effort", EFFORT_BODY.format(thinking_effort))
    tool_index = 0
    for m, calls in _tool_runs(messages):
        role = m.get("role")
        named = [("name", m["name"])] if m.get("name") else []
        if role == "system" and m.get("tools"):
            w.internal("tool-declare", DYNAMIC_TOOLS_BODY.format(sorted_json(m["tools"])))
        elif role in ("user", "system", "developer"):
            w.message([("role", "system" if role == "developer" else role)] + named, _content_text(m.get("content")))
        elif role == "assistant":
            tool_index = 0
            w.message([("role", "assistant")] + named, lambda m=m: _write_assistant(w, m, thinking))
        elif role == "tool":
            tool_index += 1
            name = m.get("tool") or m.get("name")
            if not name and tool_index <= len(calls):
                name = _call_function(calls[tool_index - 1]).get("name")
            if not name:
                raise ValueError("a tool message needs a tool name: give 'name', or answer the preceding "
                                 "assistant's tool_calls in order")
            w.message([("role", "tool"), ("tool", name), ("index", tool_index)], _content_text(m.get("content")))
        else:
            raise ValueError(f"unknown message role {role!r}")
    if tool_choice in CHOICE_BODY:
        w.internal("tool-choice", CHOICE_BODY[tool_choice])
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind == "json_object":
        w.internal("response-format", JSON_OBJECT_BODY)
    elif kind == "json_schema":
        schema = response_format.get("json_schema") or {}
        schema = schema.get("schema", schema) if isinstance(schema, dict) else schema
        w.internal("response-format", JSON_SCHEMA_BODY.format(sorted_json(schema)))
    if add_generation_prompt:
        w.open("message", ("role", "assistant"))
        w.open("think" if thinking else "response")
    return w.segments


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
           **kwargs) -> str:
    """The conversation as XTML text (what ``apply_chat_template(tokenize=False)`` returns)."""
    return "".join(s for s, _ in render_segments(messages, tools, add_generation_prompt, **kwargs))


# ---- parsing generated text -----------------------------------------------------------------------------------------
def _mark(kind: str, tag: str) -> str:
    return f"{kind}{tag}{SEP}"


THINK_OPEN, THINK_CLOSE = _mark(OPEN, "think"), _mark(CLOSE, "think")
RESPONSE_OPEN, RESPONSE_CLOSE = _mark(OPEN, "response"), _mark(CLOSE, "response")
TOOLS_OPEN, TOOLS_CLOSE = _mark(OPEN, "tools"), _mark(CLOSE, "tools")
CALL_CLOSE, MESSAGE_CLOSE = _mark(CLOSE, "call"), _mark(CLOSE, "message")
_CALL = re.compile(r"\s*<\|open\|>call(?P<attrs>(?:(?!<\|sep\|>).)*)<\|sep\|>(?P<body>.*?)"
                   r"<\|close\|>call<\|sep\|>\s*", re.S)
_ARG = re.compile(r"<\|open\|>argument(?P<attrs>(?:(?!<\|sep\|>).)*)<\|sep\|>(?P<value>.*?)"
                  r"<\|close\|>argument<\|sep\|>", re.S)
_JSON = re.compile(r"\s*<\|open\|>json(?:(?!<\|sep\|>).)*<\|sep\|>(?P<value>.*?)<\|close\|>json<\|sep\|>\s*", re.S)
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_REASONING, _OUTSIDE, _RESPONSE, _TOOLS = "reasoning", "outside", "response", "tools"


def _attrs(text: str) -> dict[str, str]:
    return {k: _unescape(v) for k, v in _ATTR.findall(text)}


class XtmlReplyParser:
    """Streaming split of a K3 reply into reasoning, content and tool calls; ``feed(delta)``, then ``finish()``.

    ``in_reasoning``: the prompt opened ``think`` (thinking mode; the default generation prompt). Otherwise the
    prompt opened ``response`` (``in_reasoning=False``). The ``think`` channel also ends when the model opens
    ``response`` or ``tools`` without closing it; text outside every channel is kept as content. Each call becomes
    a :class:`~kimi_lm.chat.ToolCall` when its ``<|close|>call<|sep|>`` arrives; ids are ``functions.NAME:IDX``
    with a conversation-wide index (the format itself numbers calls per message). A call that cannot be read (no
    tool name, unterminated, a json block that is not an object) is not dropped: its text goes to ``content`` and
    it is listed in ``ChatDelta.invalid_calls``.
    """

    def __init__(self, first_index: int = 0, in_reasoning: bool = True):
        self.next_index = first_index
        self.state = _REASONING if in_reasoning else _RESPONSE
        self._buf = ""

    def _markers(self) -> tuple[str, ...]:
        if self.state == _REASONING:
            return THINK_CLOSE, RESPONSE_OPEN, TOOLS_OPEN, MESSAGE_CLOSE, END_OF_MSG
        if self.state == _RESPONSE:
            return RESPONSE_CLOSE, TOOLS_OPEN, MESSAGE_CLOSE, END_OF_MSG
        return THINK_OPEN, RESPONSE_OPEN, TOOLS_OPEN, RESPONSE_CLOSE, THINK_CLOSE, MESSAGE_CLOSE, END_OF_MSG

    def feed(self, text: str) -> ChatDelta:
        out = ChatDelta()
        self._buf += text
        while True:
            if self.state == _TOOLS:
                if not self._read_tools(out):
                    return out
                continue
            hits = [(self._buf.find(m), m) for m in self._markers()]
            hits = [(i, m) for i, m in hits if i >= 0]
            if not hits:
                keep = partial_suffix_len(self._buf, self._markers())
                self._emit(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            i, marker = min(hits)
            self._emit(self._buf[:i], out)
            self._buf = self._buf[i + len(marker) :]
            self.state = {THINK_OPEN: _REASONING, RESPONSE_OPEN: _RESPONSE, TOOLS_OPEN: _TOOLS}.get(marker, _OUTSIDE)

    def finish(self) -> ChatDelta:
        """End of generation: flush held-back text; an unfinished call is reported, with its text as content."""
        out = ChatDelta()
        if self.state == _TOOLS:
            self._read_tools(out)
            if self._buf.strip():
                self._invalid(self._buf, "unterminated tool call (no <|close|>call<|sep|> before the end)", out)
        else:
            self._emit(self._buf, out)
        self._buf = ""
        return out

    def _emit(self, text: str, out: ChatDelta) -> None:
        if self.state == _REASONING:
            out.reasoning += text
        else:
            out.content += text

    def _read_tools(self, out: ChatDelta) -> bool:
        """Take complete calls (and the section's end) off the buffer; False when more text is needed."""
        while True:
            m = _CALL.match(self._buf)
            if m and TOOLS_CLOSE not in m.group(0) and MESSAGE_CLOSE not in m.group(0):
                self._buf = self._buf[m.end() :]
                self._call(m.group(0), m["attrs"], m["body"], out)
                continue
            end = self._buf.find(TOOLS_CLOSE)
            if end >= 0:
                junk, self._buf = self._buf[:end], self._buf[end + len(TOOLS_CLOSE) :]
                if junk.strip():
                    self._invalid(junk, "malformed tool call in the tools section", out)
                self.state = _OUTSIDE
                return True
            stop = self._buf.find(MESSAGE_CLOSE)
            if stop >= 0:  # the message ended without closing the section
                junk, self._buf = self._buf[:stop], self._buf[stop:]
                if junk.strip():
                    self._invalid(junk, "unterminated tool call (the message ended inside the tools section)", out)
                self.state = _OUTSIDE
                return True
            return False

    def _invalid(self, raw: str, error: str, out: ChatDelta) -> None:
        index, self.next_index = self.next_index, self.next_index + 1
        out.content += raw
        out.invalid_calls.append(ToolCall(f"functions.:{index}", "", raw, None, error, raw))

    def _call(self, raw: str, attrs: str, body: str, out: ChatDelta) -> None:
        name = _attrs(attrs).get("tool", "")
        if not name:
            return self._invalid(raw, "tool call without a tool name", out)
        block = _JSON.fullmatch(body)
        if block:
            try:
                args = json.loads(block["value"])
            except json.JSONDecodeError as exc:
                return self._invalid(raw, f"invalid JSON arguments: {exc}", out)
            if not isinstance(args, dict):
                return self._invalid(raw, f"arguments must be a JSON object, got {type(args).__name__}", out)
        else:
            args = {}
            for a in _ARG.finditer(body):
                at = _attrs(a["attrs"])
                if "key" not in at:
                    return self._invalid(raw, "tool argument without a key", out)
                value = a["value"]
                if at.get("type", "string") != "string":
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass  # the reference keeps the raw text
                args[at["key"]] = value
            if _ARG.sub("", body).strip():
                return self._invalid(raw, "unexpected text between a tool call's arguments", out)
        index, self.next_index = self.next_index, self.next_index + 1
        out.tool_calls.append(ToolCall(f"functions.{name}:{index}", name, json.dumps(args, ensure_ascii=False),
                                       args, None, raw))
