"""Request -> engine: the checks only the model can make, prompt ids, and ``n`` :class:`Sequence` objects per prompt.

pydantic (:mod:`kimi_lm.server.protocol`) has already checked each field's type and range; here the request is
checked against the served model (model name, prompt length, context length, token ids, ``logit_bias``, tool
choice) and every failure is an :class:`APIError` naming the parameter. The chat template renders the messages
(with tools and a forced tool-call opening for ``tool_choice``), and the sampling fields become one
:class:`~kimi_lm.sample.Sampler` per choice (choice ``i`` seeded with ``seed + i``).

Thinking switches: ``chat_template_kwargs`` go to the template as they are (``{"thinking": false}``, K3's
``{"thinking_effort": "low"}``); ``reasoning_effort`` is mapped onto them (:data:`EFFORTS`): ``"none"`` sets
``thinking=False`` (and ``enable_thinking=False``), other values pick K3's ``thinking_effort``. A template without a
thinking switch (K2-Thinking always thinks) ignores them, as vLLM does. With Kimi K3's format, ``tool_choice`` and
``response_format`` are written into the prompt as the reference encoder does (a named function: only that tool is
declared, and a call is required).

References: OpenAI API reference (chat/completions, completions); vLLM ``entrypoints/openai/serving_chat.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kimi_lm.chat import ARGS_BEGIN, CALL_BEGIN, SECTION_BEGIN, count_tool_calls
from kimi_lm.sample import Sampler, SamplingParams
from kimi_lm.server.engine import Sequence
from kimi_lm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_PROMPT_TOKENS = 32768
EFFORTS = {"minimal": "low", "low": "low", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}  # -> K3


@dataclass
class ServerConfig:
    """What the routes need to know besides the engine."""

    model_name: str  # the id clients send as "model"
    context_length: int  # longest prompt + completion
    api_key: str | None = None
    default_max_tokens: int = 512  # completion length when a request gives none
    default_temperature: float = 1.0  # OpenAI's default
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longer prompts are refused before any work is done


def check_model(config: ServerConfig, name: str | None) -> None:
    if name is not None and name != config.model_name:
        raise APIError(f"the model {name!r} does not exist; this server serves {config.model_name!r}", "model",
                       "model_not_found")


@dataclass
class ChatPrompt:
    ids: list[int]
    forced: str  # the start of the reply the template appended (tool_choice "required" or a named function)
    first_call: int  # index of the reply's first tool call (calls are numbered across the conversation)


def template_kwargs(tok, req: ChatCompletionRequest) -> dict:
    """``chat_template_kwargs`` with ``reasoning_effort`` mapped onto the template's thinking switches."""
    kwargs = dict(req.chat_template_kwargs or {})
    effort = req.reasoning_effort
    if effort == "none":
        kwargs.setdefault("thinking", False)
        kwargs.setdefault("enable_thinking", False)
    elif effort is not None and tok.chat_format == "xtml":
        kwargs.setdefault("thinking_effort", EFFORTS[effort])
    if tok.chat_format == "xtml" and "enable_thinking" in kwargs:  # the common name for K3's "thinking"
        kwargs.setdefault("thinking", kwargs.pop("enable_thinking"))
    return kwargs


def chat_prompt(tok, req: ChatCompletionRequest) -> ChatPrompt:
    """Render the messages (and tools) with the chat template and encode them."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    xtml = tok.chat_format == "xtml"
    for m in messages:
        for call in m.get("tool_calls") or []:  # the template wants arguments as the JSON text the model wrote
            if isinstance(call["function"]["arguments"], dict):
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    first = count_tool_calls(messages)
    forced = ""
    kwargs = template_kwargs(tok, req)
    if choice not in (None, "none", "auto") and not tools:
        raise APIError("tool_choice needs tools", "tool_choice")
    if choice not in (None, "none", "auto", "required"):
        name = choice.function["name"]
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    if xtml:  # K3 states tool_choice and response_format in the prompt
        if choice not in (None, "none", "auto", "required"):
            tools, choice = [t for t in tools if t["function"]["name"] == choice.function["name"]], "required"
        kwargs.update(tool_choice=choice, response_format=req.response_format)
    elif choice == "required":  # the reply must open a call; the model picks the function
        forced = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions."
    elif choice not in (None, "none", "auto"):
        forced = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions.{choice.function['name']}:{first}{ARGS_BEGIN}"
    try:
        ids = tok.apply_chat_template(messages, tools=None if choice == "none" and not xtml else tools,
                                      add_generation_prompt=True, tokenize=True, **kwargs)
    except ValueError as exc:
        raise APIError(str(exc), "chat_template_kwargs" if "thinking_effort" in str(exc) else "messages") from None
    return ChatPrompt(ids + tok.encode(forced), forced, first)


def completion_prompts(tok, req: CompletionRequest) -> list[list[int]]:
    """``prompt`` as a list of id lists: a string, a list of strings, ids, or a list of id lists."""
    p = req.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise APIError("the prompt is empty", "prompt")
    return [tok.encode(x) if isinstance(x, str) else list(x) for x in prompts]


def _check_prompt(engine, config: ServerConfig, ids: list[int], param: str, max_tokens: int | None) -> None:
    if not ids:
        raise APIError("the prompt is empty", param)
    if len(ids) > config.max_prompt_tokens:
        raise APIError(f"the prompt has {len(ids)} tokens; this server accepts prompts of at most "
                       f"{config.max_prompt_tokens} tokens (kimi-lm serve --max-prompt-tokens)", param,
                       "prompt_too_long")
    limit = config.context_length
    if len(ids) + (max_tokens or 1) > limit:
        raise APIError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                       f"tokens and {max_tokens or 1} more were requested", param, "context_length_exceeded")
    vocab = min(engine.model.config.vocab_size, engine.tokenizer.n_vocab)
    if any(not 0 <= i < vocab for i in ids):
        raise APIError(f"prompt token ids must be in [0, {vocab})", param)


def _logit_bias(req, vocab: int) -> dict[int, float] | None:
    try:
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
    except ValueError:
        raise APIError("logit_bias keys must be token ids", "logit_bias") from None
    if any(not 0 <= k < vocab for k in bias) or any(abs(v) > 100 for v in bias.values()):
        raise APIError(f"logit_bias keys must be token ids in [0, {vocab}) and values in [-100, 100]", "logit_bias")
    return bias or None


def sequences(engine, config: ServerConfig, req, ids: list[int], param: str, logprobs: int | None,
              emit_for) -> list[Sequence]:
    """``req.n`` sequences for one prompt, after every check that needs the model; ``emit_for(i)`` is choice i's
    event callback."""
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    _check_prompt(engine, config, ids, param, max_tokens)
    max_tokens = max_tokens or min(config.default_max_tokens, config.context_length - len(ids))
    bias = _logit_bias(req, engine.model.config.vocab_size)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_ids = engine.tokenizer.stop_token_ids | set(req.stop_token_ids or [])
    out = []
    for i in range(req.n):
        params = SamplingParams(
            temperature=config.default_temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=bias, seed=None if req.seed is None else req.seed + i)
        try:
            sampler = Sampler(params, device=engine.model.device)
        except ValueError as exc:
            raise APIError(str(exc), str(exc).split()[0]) from None
        out.append(Sequence(ids, sampler, max_tokens, emit_for(i), stop, stop_ids, logprobs))
    return out
