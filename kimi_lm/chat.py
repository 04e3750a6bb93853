"""Chat formatting for Kimi: rendering the checkpoint's chat template, and reading tool calls out of generated text.

Rendering: the template is a Jinja file shipped with the checkpoint, i.e. untrusted input. It runs in jinja2's
``ImmutableSandboxedEnvironment`` with the environment transformers uses (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``tojson`` that does not HTML-escape, ``raise_exception``, ``strftime_now``), and sees only plain
JSON data. ``tools`` are key-sorted recursively first, as the official tokenizer's ``apply_chat_template`` does.

Tool calls, as Kimi models write them (spec §7.3)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>
    … more calls … <|tool_calls_section_end|>

:class:`ToolCallParser` reads that format from a stream of text deltas. It also accepts the singular
``<|tool_call_section_begin|>`` spelling, a section that opens while still inside ``<think>`` (no ``</think>``), and a
call without a section. Marker text never reaches ``content``: text that could be the start of a marker is held back
until it is decided. Ids are canonical ``functions.<name>:<idx>`` with a conversation-wide index (K2 goes silent on
rewritten ids such as ``call_…``). A call that cannot be used (arguments that are not a JSON object, no name,
unterminated) is never dropped: its text, markers included, goes to ``content`` where the model wrote it, and the
call is listed in ``ChatDelta.invalid_calls`` with its ``error`` (vLLM also returns an unparsable reply as content).

Formats: the checkpoint's Jinja template (Kimi Linear, K2-Instruct, K2-Thinking: the official K2-Thinking template
ships in ``kimi_lm/templates/``, see :func:`builtin_template`); Kimi K3's XTML is rendered and parsed by
:mod:`kimi_lm.xtml`. :func:`reply_parser` / :func:`parse_reply` pick the parser for a tokenizer's format, so callers
get ``reasoning_content``, ``content`` and ``tool_calls`` apart without knowing which format the model speaks.

References: transformers ``utils/chat_template_utils.py`` (sandbox environment); vLLM and mlx-lm ``kimi_k2`` tool
parsers; llama.cpp#17376 (singular section token); vLLM#32216 (tool calls without ``</think>``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN, ARGS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
THINK_BEGIN, THINK_END = "<think>", "</think>"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---- rendering ------------------------------------------------------------------------------------------------------
def deep_sort_dict(obj):
    """Sort every dict's keys recursively (the official tokenizer does this to ``tools`` before rendering)."""
    if isinstance(obj, dict):
        return {k: deep_sort_dict(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [deep_sort_dict(v) for v in obj]
    return obj


def _plain(value):
    """Only JSON-like data enters the sandbox; anything else becomes an inert "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the sandbox (raises ``jinja2.TemplateSyntaxError`` for a template that does not
    parse); cached, so rendering the same template again does not recompile it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], tools: list[dict] | None = None,
                         add_generation_prompt: bool = True, **kwargs) -> str:
    """Render ``messages`` (+ ``tools`` JSON schemas) exactly as transformers renders the same template."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of dicts, each with a 'role' (and usually 'content')")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        tools = deep_sort_dict(tools)
    chat = []
    for m in _plain(messages):
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:  # templates read either name (transformers aliases them the same way)
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    try:
        return compile_template(template).render(messages=chat, tools=_plain(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt, **_plain(kwargs))
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template: {exc}") from None


def count_tool_calls(messages: list[dict]) -> int:
    """Tool calls already in a conversation: the next call's global index."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


# ---- parsing generated text -----------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    id: str  # canonical functions.<name>:<idx>
    name: str
    arguments: str  # the arguments as JSON text (Kimi format: as generated; XTML: re-serialised)
    parsed: dict | None = None  # the arguments as an object, None if they are not valid JSON
    error: str | None = None  # why the call is unusable (invalid JSON, unterminated, no name)
    raw: str = ""  # the call's text as generated, markers included (a bad call's text is returned as content)

    def to_message(self) -> dict:
        """OpenAI / chat-template form, for the assistant message's ``tool_calls`` list."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ChatDelta:
    """What a reply parser made certain: text by channel, good tool calls, and calls that could not be read (their
    text is already in ``content``, where it stood in the reply)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: "ChatDelta") -> "ChatDelta":
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        self.invalid_calls += other.invalid_calls
        return self


_CONTENT, _REASONING, _SECTION, _CALL_ID, _CALL_ARGS = "content", "reasoning", "section", "call_id", "call_args"
_CANONICAL_ID = re.compile(r"functions\.(?P<name>[^\s:]+):(?P<idx>\d+)")
_NAME_IDX = re.compile(r"(?P<name>[^\s:]+?)(?::(?P<idx>\d+))?")


class ToolCallParser:
    """Streaming split of generated text into content, reasoning and tool calls. ``feed(delta)`` as text arrives,
    ``finish()`` at the end; both return a :class:`ChatDelta` with what became certain.

    ``first_index``: tool calls earlier in the conversation (:func:`count_tool_calls`), so ids stay globally unique.
    ``thinking``: separate ``<think>…</think>`` (when the template uses it); ``in_reasoning``: the prompt already
    opened ``<think>``.
    """

    def __init__(self, first_index: int = 0, thinking: bool = False, in_reasoning: bool = False):
        self.next_index = first_index
        self.thinking = thinking
        self.state = _REASONING if in_reasoning else _CONTENT
        self._buf = ""
        self._id = ""
        self._args = ""
        self._raw = ""  # the open call's text as generated

    def _markers(self) -> tuple[str, ...]:
        """Markers to look for in the current state. Outside a section, stray call markers are matched too (and
        dropped) so that no marker text ever reaches content or reasoning."""
        if self.state == _SECTION:
            return (CALL_BEGIN,) + SECTION_END
        if self.state == _CALL_ID:
            return (ARGS_BEGIN, CALL_END, CALL_BEGIN) + SECTION_END
        if self.state == _CALL_ARGS:
            return (CALL_END, CALL_BEGIN) + SECTION_END
        think = (THINK_BEGIN, THINK_END) if self.thinking or self.state == _REASONING else ()
        return SECTION_BEGIN + SECTION_END + (CALL_BEGIN, ARGS_BEGIN, CALL_END) + think

    def feed(self, text: str) -> ChatDelta:
        out = ChatDelta()
        self._buf += text
        while True:
            markers = self._markers()
            hits = [(self._buf.find(m), m) for m in markers]
            hits = [(i, m) for i, m in hits if i >= 0]
            if not hits:
                keep = partial_suffix_len(self._buf, markers)
                self._emit(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            i, marker = min(hits, key=lambda h: (h[0], -len(h[1])))
            self._emit(self._buf[:i], out)
            self._buf = self._buf[i + len(marker) :]
            self._transition(marker, out)

    def finish(self) -> ChatDelta:
        """End of generation: flush held-back text; an open call is reported as unterminated."""
        out = ChatDelta()
        self._emit(self._buf, out)
        self._buf = ""
        if self.state in (_CALL_ID, _CALL_ARGS):
            self._close_call(out, error=f"unterminated tool call (no {CALL_END} before the end of the text)")
        self.state = _CONTENT
        return out

    def _emit(self, text: str, out: ChatDelta) -> None:
        if self.state == _CONTENT:
            out.content += text
        elif self.state == _REASONING:
            out.reasoning += text
        elif self.state == _CALL_ID:
            self._id += text
            self._raw += text
        elif self.state == _CALL_ARGS:
            self._args += text
            self._raw += text
        # _SECTION: only whitespace between calls is expected there; nothing of it is content

    def _transition(self, marker: str, out: ChatDelta) -> None:
        in_call = self.state in (_CALL_ID, _CALL_ARGS)
        if marker == THINK_BEGIN:
            self.state = _REASONING
        elif marker == THINK_END:
            self.state = _CONTENT
        elif marker in SECTION_BEGIN:
            self.state = _SECTION
        elif marker == CALL_BEGIN:  # also opens a call the model wrote without a section
            if in_call:
                self._close_call(out, error=f"unterminated tool call (a new {CALL_BEGIN} came before {CALL_END})")
            self.state = _CALL_ID
            self._raw = marker
        elif marker == ARGS_BEGIN and self.state == _CALL_ID:
            self.state = _CALL_ARGS
            self._raw += marker
        elif marker == CALL_END and in_call:
            self._raw += marker
            self._close_call(out)
            self.state = _SECTION
        elif marker in SECTION_END and (in_call or self.state == _SECTION):
            if in_call:
                self._close_call(out, error=f"unterminated tool call (the section ended before {CALL_END})")
            self.state = _CONTENT
        # anything else is a stray marker outside a section: dropped

    def _close_call(self, out: ChatDelta, error: str | None = None) -> None:
        call = self._make_call(self._id.strip(), self._args.strip(), error)
        call.raw = self._raw
        if call.error is None:
            out.tool_calls.append(call)
        else:  # never dropped: the text stays in the reply as content (vLLM returns unparsable calls the same way)
            out.content += call.raw
            out.invalid_calls.append(call)
        self._id = self._args = self._raw = ""

    def _make_call(self, raw_id: str, arguments: str, error: str | None) -> ToolCall:
        index = self.next_index
        self.next_index += 1
        m = _CANONICAL_ID.fullmatch(raw_id)
        if m:  # already canonical: keep it verbatim, the model refers back to it
            name, call_id = m["name"], raw_id
        else:
            m = _NAME_IDX.fullmatch(raw_id)
            name = m["name"] if m else ""
            call_id = f"functions.{name}:{index}"
            if not name:
                error = error or f"tool call without a function name (id {raw_id!r})"
        parsed = None
        if error is None:
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as exc:
                error = f"invalid JSON arguments: {exc}"
            else:
                if not isinstance(parsed, dict):
                    parsed, error = None, f"arguments must be a JSON object, got {type(parsed).__name__}"
        return ToolCall(id=call_id, name=name, arguments=arguments, parsed=parsed, error=error)


def partial_suffix_len(text: str, markers) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers`` (tool-call markers,
    stop strings): text a later token may complete into a marker, so a stream holds it back."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def parse_assistant_message(text: str, first_index: int = 0, thinking: bool = False,
                            in_reasoning: bool = False) -> dict:
    """A complete generated reply in the Kimi format -> assistant message (see :func:`message_from_delta`)."""
    parser = ToolCallParser(first_index, thinking, in_reasoning)
    delta = parser.feed(text)
    delta += parser.finish()
    return message_from_delta(delta)


def message_from_delta(delta: ChatDelta) -> dict:
    """A whole reply's :class:`ChatDelta` -> {role, content, [reasoning_content], [tool_calls], [tool_call_errors]}.

    Calls that could not be read stay in ``content`` as the text the model wrote and are listed under
    ``tool_call_errors`` ({id, error}); ``tool_calls`` holds only usable ones.
    """
    message: dict = {"role": "assistant", "content": delta.content}
    if delta.reasoning:
        message["reasoning_content"] = delta.reasoning
    if delta.tool_calls:
        message["tool_calls"] = [c.to_message() for c in delta.tool_calls]
    if delta.invalid_calls:
        message["tool_call_errors"] = [{"id": c.id, "error": c.error} for c in delta.invalid_calls]
    return message


def reply_parser(tokenizer, prompt_ids=(), first_index: int = 0):
    """The streaming reply parser for ``tokenizer``'s chat format, primed by how the prompt ends: an XTML prompt
    that opened ``think`` (thinking) or ``response``; a Kimi prompt that opened ``<think>`` (K2.5-style templates)."""
    tail = tokenizer.decode(list(prompt_ids)[-32:]) if len(prompt_ids) else ""
    if tokenizer.chat_format == "xtml":
        from kimi_lm.xtml import RESPONSE_OPEN, XtmlReplyParser

        return XtmlReplyParser(first_index, in_reasoning=not tail.endswith(RESPONSE_OPEN))
    return ToolCallParser(first_index, thinking=tokenizer.has_thinking, in_reasoning=tail.endswith(THINK_BEGIN))


def parse_reply(tokenizer, text: str, prompt_ids=(), first_index: int = 0) -> dict:
    """A finished reply (the text ``generate`` returned for a chat prompt) -> assistant message with the reasoning
    (``reasoning_content``), the answer (``content``) and ``tool_calls`` apart, in ``tokenizer``'s chat format."""
    parser = reply_parser(tokenizer, prompt_ids, first_index)
    delta = parser.feed(text)
    delta += parser.finish()
    return message_from_delta(delta)


def builtin_template(name: str) -> str:
    """A chat template shipped with kimi-lm (``kimi_lm/templates/NAME.jinja``), e.g. ``kimi-k2-thinking``."""
    from importlib.resources import files

    folder = files("kimi_lm") / "templates"
    names = sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))
    if name not in names:
        raise ValueError(f"no built-in chat template {name!r}; built in: {', '.join(names)}")
    return (folder / f"{name}.jinja").read_text(encoding="utf-8")
