"""The OpenAI-compatible server end to end: the real ``openai`` client against uvicorn on a random localhost port,
serving the tiny chat checkpoint (tests/tiny_chat.py). Greedy outputs are compared with ``kimi_lm.generate``;
scripted replies check tool calls, reasoning (K2-Thinking's template, Kimi K3's XTML) and their JSON fields."""

import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import kimi_lm
from kimi_lm.cache import ModelCache
from kimi_lm.chat import count_tool_calls, parse_assistant_message
from kimi_lm.server import ServerConfig, create_app
from kimi_lm.server.engine import Engine
from serving import ScriptedModel, Server
from tiny_chat import XTML_JINJA, chat_checkpoint, k3_chat_checkpoint, one_thread  # noqa: F401  (one_thread: autouse fixture)

NAME = "tiny-kimi"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = chat_checkpoint(tmp_path_factory)
    model, tok = kimi_lm.load(path, dtype=torch.float32), kimi_lm.load_tokenizer(path)
    engine = Engine(model, tok, max_batch_size=32)
    servers = {"main": Server(create_app(engine, ServerConfig(NAME, 4096, default_temperature=0.0))),
               "key": Server(create_app(engine, ServerConfig(NAME, 4096, api_key="sekret"))),
               "short": Server(create_app(engine, ServerConfig(NAME, 40)))}
    yield model, tok, engine, servers
    for s in servers.values():
        s.close()
    engine.close()


def reference(model, tok, messages, max_tokens, **kw):
    """Prompt ids and the greedy reply's content as a single run gives it (tool-call markers parsed out)."""
    ids = tok.apply_chat_template(messages, tokenize=True)
    text = kimi_lm.generate(model, tok, ids, max_tokens=max_tokens, temperature=0, **kw)
    return ids, parse_assistant_message(text, count_tool_calls(messages), tok.has_thinking)["content"]


def test_models_and_health(setup):
    *_, servers = setup
    assert [m.id for m in servers["main"].client().models.list().data] == [NAME]
    assert httpx.get(servers["main"].url + "/health").json()["status"] == "ok"


def test_chat_non_stream_and_stream_match_generate(setup):
    model, tok, _, servers = setup
    client = servers["main"].client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    ids, expected = reference(model, tok, messages, 12)
    steps = list(kimi_lm.stream_generate(model, tok, ids, max_tokens=12, temperature=0))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == steps[-1].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(steps))
    assert r.usage.total_tokens == len(ids) + len(steps)

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_content_parts_equal_string_content(setup):
    *_, servers = setup
    client = servers["main"].client()
    a = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": "the lazy dog"}])
    b = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "the lazy dog"}]}])
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_prompt_text_ids_echo_logprobs(setup):
    model, tok, _, servers = setup
    client = servers["main"].client()
    prompt = "The quick brown fox"
    expected = kimi_lm.generate(model, tok, prompt, max_tokens=8, temperature=0)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=2)
    assert r.choices[0].text == prompt + expected
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the likeliest
        assert chosen >= max(top.values()) - 1e-6 and chosen <= 0
    by_ids = client.completions.create(model=NAME, prompt=tok.encode(prompt), max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == expected and by_ids.usage.prompt_tokens == len(tok.encode(prompt))
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_seed_determinism_and_n(setup):
    *_, servers = setup
    client = servers["main"].client()
    kw = dict(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c
    two = client.chat.completions.create(seed=7, n=2, **kw).choices
    assert [ch.index for ch in two] == [0, 1] and two[0].message.content == a  # choice i uses seed + i
    assert two[1].message.content == c


def test_stop_strings(setup):
    model, tok, _, servers = setup
    messages = [{"role": "user", "content": "hello world"}]
    _, full = reference(model, tok, messages, 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2
    r = servers["main"].client().chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                                          temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_logprobs(setup):
    *_, servers = setup
    r = servers["main"].client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)
        assert sum(torch.tensor([t.logprob for t in item.top_logprobs]).exp()) <= 1 + 1e-5


def test_prefix_reuse_is_exact(setup):
    """Turn 2 resends turn 1: the state is restored (cached_tokens > 0) and the reply equals a cold run's."""
    model, tok, _, servers = setup
    client = servers["main"].client()
    turn1 = [{"role": "user", "content": "the quick brown fox"}]
    r1 = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=10, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "and the lazy dog?"}]
    r2 = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=10, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.choices[0].message.content == reference(model, tok, turn2, 10)[1]


def test_32_concurrent_streams_match_single_runs_and_survive_a_disconnect(setup):
    model, tok, engine, servers = setup
    prompts = [[{"role": "user", "content": f"hello {i} world {i * 7}"}] for i in range(32)]
    expected = [reference(model, tok, p, 8)[1] for p in prompts]
    client = servers["main"].client()

    def run(p):
        stream = client.chat.completions.create(model=NAME, messages=p, max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def disconnect():  # a long stream abandoned after two chunks
        with httpx.stream("POST", servers["main"].url + "/v1/chat/completions", timeout=30,
                          json={"model": NAME, "messages": prompts[0], "max_tokens": 2000, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
        return "gone"

    with ThreadPoolExecutor(max_workers=33) as pool:
        gone = pool.submit(disconnect)
        results = list(pool.map(run, prompts, timeout=120))
        assert gone.result(timeout=60) == "gone"
    assert results == expected
    deadline = time.time() + 10
    while engine.num_active and time.time() < deadline:  # the abandoned stream's slot is freed
        time.sleep(0.05)
    assert engine.num_active == 0
    gc.collect()  # no cache outlives its request except those kept, within budget, for prefix reuse
    live = [o for o in gc.get_objects() if type(o) is ModelCache]
    assert len(live) == len(engine.pool.entries) and engine.pool.nbytes <= engine.pool.max_bytes
    assert run(prompts[1]) == expected[1]  # still serving


def test_api_key(setup):
    *_, servers = setup
    r = httpx.get(servers["key"].url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert servers["key"].client("sekret").models.list().data[0].id == NAME


BAD = [  # (body, param, text in the message)
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, "model", "does not exist"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens", "greater than or equal"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, "temperature", "greater than or equal"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name", "required"),
    ({"messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "greater than"),
]


@pytest.mark.parametrize("body,param,text", BAD)
def test_bad_chat_requests(setup, body, param, text):
    *_, servers = setup
    r = httpx.post(servers["main"].url + "/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and text in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_malformed_json_long_prompt_and_bad_token_ids(setup):
    *_, servers = setup
    r = httpx.post(servers["main"].url + "/v1/chat/completions", content=b'{"messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(servers["short"].url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hello " * 60}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "messages"
    r = httpx.post(servers["main"].url + "/v1/completions", json={"prompt": [1, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert servers["main"].client().completions.create(model=NAME, prompt="ok", max_tokens=2).choices  # still fine


# ---- tool calls: a model that writes a scripted reply ------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(setup):
    model, tok, *_ = setup
    reply = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
             '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    engine = Engine(ScriptedModel(model, tok.encode(reply)), tok, prompt_cache_bytes=0)
    server = Server(create_app(engine, ServerConfig(NAME, 4096)))
    server.tokenizer = tok
    yield server
    server.close()
    engine.close()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]


def test_tool_call_round_trip(tool_server):
    client = tool_server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:0", "get_weather", {"city": "Paris"})

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=64,
                                                 stream=True))
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.id, d.function.name) for d in deltas] == [(0, "functions.get_weather:0", "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""

    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    again = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=64)
    # the history (assistant tool_calls with the canonical id, then the tool result) renders as the template does
    rendered = tool_server.tokenizer.apply_chat_template(history, tools=TOOLS)
    assert "## Return of functions.get_weather:0\nsunny, 21 C" in rendered
    assert again.usage.prompt_tokens == len(tool_server.tokenizer.encode(rendered))


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nope", 404, "not_found"),
    ("POST", "/chat/completion", 404, "not_found"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods_answer_openai_errors(setup, method, path, status, code):
    *_, servers = setup
    r = httpx.request(method, servers["main"].url + path)
    err = r.json()["error"]  # not FastAPI's {"detail": ...}
    assert r.status_code == status and err["code"] == code and err["type"] == "invalid_request_error"
    assert path in err["message"] and "/v1/chat/completions" in err["message"]


def test_health_shows_prefilling_and_decoding(setup):
    *_, servers = setup
    h = httpx.get(servers["main"].url + "/health").json()
    assert h["model"] == NAME and h["prefilling"] == [] and h["decoding"] == 0 and h["waiting"] == 0


# ---- reasoning: K2-Thinking (official template) and Kimi K3 (XTML), scripted replies ---------------------------------
def _scripted(model, tok, reply: str):
    engine = Engine(ScriptedModel(model, tok.encode(reply)), tok, prompt_cache_bytes=0)
    return engine, Server(create_app(engine, ServerConfig(NAME, 4096)))


def _chat(server, stream=False, **body):
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 400, "stream": stream,
            **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


CALL_SECTION = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
BAD_CALL = ('<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": Paris}'
            '<|tool_call_end|>')


@pytest.fixture(scope="module")
def k2_thinking_tok(setup, tmp_path_factory):
    return kimi_lm.load_tokenizer(chat_checkpoint(tmp_path_factory), chat_template="kimi-k2-thinking")


@pytest.mark.parametrize("reply, reasoning, content, calls", [
    ("<think>Need the weather.</think>Checking." + CALL_SECTION, "Need the weather.", "Checking.", 1),
    ("<think>Need the weather." + CALL_SECTION, "Need the weather.", "", 1),  # the section closes the thinking
    ("<think>hmm</think>" + "<|tool_calls_section_begin|>" + BAD_CALL + "<|tool_calls_section_end|>", "hmm",
     BAD_CALL, 0),  # a malformed call is returned as content, not dropped
])
def test_k2_thinking_reasoning_and_tool_calls(setup, k2_thinking_tok, reply, reasoning, content, calls):
    model, *_ = setup
    engine, server = _scripted(model, k2_thinking_tok, reply + "<|im_end|>")
    try:
        body = _chat(server, tools=TOOLS)
        msg, choice = body["choices"][0]["message"], body["choices"][0]
        assert msg["reasoning"] == msg["reasoning_content"] == reasoning
        assert (msg["content"] or "") == content and len(msg.get("tool_calls") or []) == calls
        assert choice["finish_reason"] == ("tool_calls" if calls else "stop")
        if calls:
            assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

        chunks = _chat(server, stream=True, tools=TOOLS)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
        assert "".join(d.get("reasoning") or "" for d in deltas) == reasoning
        assert "".join(d.get("content") or "" for d in deltas) == content
        assert sum(len(d.get("tool_calls") or []) for d in deltas) == calls
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    finally:
        server.close()
        engine.close()


def test_k2_thinking_prompt_drops_history_thinking(setup, k2_thinking_tok):
    model, *_ = setup
    engine, server = _scripted(model, k2_thinking_tok, "<think>x</think>ok<|im_end|>")
    try:
        history = [{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4", "reasoning": "adding"},
                   {"role": "user", "content": "3+3?"}]
        body = _chat(server, messages=history)
        rendered = k2_thinking_tok.apply_chat_template(history)
        assert "<think></think>4<|im_end|>" in rendered and "adding" not in rendered
        assert body["usage"]["prompt_tokens"] == len(k2_thinking_tok.encode(rendered))
    finally:
        server.close()
        engine.close()


K3_REPLY = ('Need the weather.<|close|>think<|sep|><|open|>response<|sep|>Checking.<|close|>response<|sep|>'
            '<|open|>tools<|sep|><|open|>call tool="get_weather" index="1"<|sep|>'
            '<|open|>argument key="city" type="string"<|sep|>Paris<|close|>argument<|sep|><|close|>call<|sep|>'
            '<|close|>tools<|sep|><|close|>message<|sep|><|end_of_msg|>')


@pytest.fixture(scope="module")
def k3_server(tmp_path_factory):
    path = k3_chat_checkpoint(tmp_path_factory)
    model, tok = kimi_lm.load(path, dtype=torch.float32), kimi_lm.load_tokenizer(path)
    engine, server = _scripted(model, tok, K3_REPLY)
    server.tokenizer, server.engine_model = tok, engine.model
    yield server
    server.close()
    engine.close()


def test_k3_chat_reasoning_tool_calls_and_stop_token(k3_server):
    tok = k3_server.tokenizer
    body = _chat(k3_server, tools=TOOLS)
    choice = body["choices"][0]
    msg = choice["message"]
    assert msg["reasoning"] == msg["reasoning_content"] == "Need the weather." and msg["content"] == "Checking."
    assert msg["tool_calls"] == [{"id": "functions.get_weather:0", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert choice["finish_reason"] == "tool_calls"  # ended by <|end_of_msg|>
    assert body["usage"]["completion_tokens"] == len(tok.encode(K3_REPLY))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tokenize=True)
    assert body["usage"]["prompt_tokens"] == len(prompt)

    chunks = _chat(k3_server, stream=True, tools=TOOLS)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    assert [(t["index"], t["function"]["name"]) for d in deltas for t in d.get("tool_calls") or []] == [
        (0, "get_weather")]
    assert not any("<|" in (d.get("content") or "") + (d.get("reasoning") or "") for d in deltas)


@pytest.mark.parametrize("body, kwargs", [
    ({"reasoning_effort": "none"}, {"thinking": False}),
    ({"chat_template_kwargs": {"thinking": False}}, {"thinking": False}),
    ({"chat_template_kwargs": {"enable_thinking": False}}, {"thinking": False}),
    ({"reasoning_effort": "low"}, {"thinking_effort": "low"}),
    ({"reasoning_effort": "medium"}, {"thinking_effort": "high"}),
    ({"tool_choice": "required", "tools": TOOLS}, {"tool_choice": "required", "tools": TOOLS}),
    ({"response_format": {"type": "json_object"}}, {"response_format": {"type": "json_object"}}),
])
def test_k3_thinking_switches_reach_the_prompt(k3_server, body, kwargs):
    tok = k3_server.tokenizer
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    got = _chat(k3_server, **body)["usage"]["prompt_tokens"]
    assert got == len(tok.apply_chat_template(messages, tokenize=True, **kwargs))
    if "thinking_effort" not in kwargs:  # "low" and "max" happen to be the same number of tokens
        assert got != len(tok.apply_chat_template(messages, tokenize=True))


def test_k3_bad_thinking_effort_is_a_400(k3_server):
    r = httpx.post(k3_server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"thinking_effort": "huge"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


# the exact prompt ids the engine fed the model (ScriptedModel records every prefill)
def _last_prompt(server) -> list[int]:
    return server.engine_model.prompts[-1]


@pytest.mark.parametrize("body, kwargs", [
    ({"reasoning_effort": "low"}, {"thinking_effort": "low"}),
    ({"reasoning_effort": "high"}, {"thinking_effort": "high"}),
    ({"reasoning_effort": "max"}, {"thinking_effort": "max"}),
    ({"chat_template_kwargs": {"thinking_effort": "low"}}, {"thinking_effort": "low"}),
    ({"chat_template_kwargs": {"thinking_effort": "max"}, "reasoning_effort": "low"}, {"thinking_effort": "max"}),
    ({"reasoning_effort": "none"}, {"thinking": False}),
])
def test_k3_thinking_effort_reaches_the_exact_prompt(k3_server, body, kwargs):
    tok = k3_server.tokenizer
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    _chat(k3_server, max_tokens=2, **body)
    expected = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    assert _last_prompt(k3_server) == expected
    effort = kwargs.get("thinking_effort")
    assert (f"`thinking_effort={effort}`" in tok.decode(expected)) == (effort is not None)


def test_k3_tools_are_declared_and_tool_results_render_in_xtml(k3_server):
    tok = k3_server.tokenizer
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    body = _chat(k3_server, tools=TOOLS)
    prompt = tok.decode(_last_prompt(k3_server))
    assert _last_prompt(k3_server) == tok.apply_chat_template(messages, tools=TOOLS, tokenize=True)
    assert prompt.startswith('<|open|>message role="system" type="tool-declare"<|sep|># Tools\n')
    assert json.dumps(TOOLS, sort_keys=True, separators=(",", ":")) in prompt  # keys sorted, compact
    call = body["choices"][0]["message"]["tool_calls"][0]
    history = messages + [body["choices"][0]["message"],
                          {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    again = _chat(k3_server, tools=TOOLS, messages=history)
    prompt = tok.decode(_last_prompt(k3_server))
    assert ('<|open|>call tool="get_weather" index="1"<|sep|><|open|>argument key="city" type="string"<|sep|>Paris'
            in prompt)
    assert '<|open|>message role="tool" tool="get_weather" index="1"<|sep|>sunny, 21 C<|close|>message' in prompt
    assert '<|open|>think<|sep|>Need the weather.<|close|>think<|sep|>' in prompt  # K3 keeps earlier thinking
    assert again["choices"][0]["message"]["tool_calls"][0]["id"] == "functions.get_weather:1"




@pytest.mark.slow  # ~25 s: a fresh interpreter imports torch and loads the model
def test_kimi_lm_serve_command_on_a_k3_checkpoint_with_a_chat_template_file(tmp_path_factory, tmp_path):
    """The real command in its own process: `python -m kimi_lm serve --model K3DIR --chat-template FILE`."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    path = k3_chat_checkpoint(tmp_path_factory)
    template = tmp_path / "xtml.jinja"
    template.write_text(XTML_JINJA)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_lm", "serve", "--model", str(path), "--port", str(port),
                             "--chat-template", str(template), "--temp", "0", "--max-tokens", "8",
                             "--dtype", "float32", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "kimi-lm serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        tok = kimi_lm.load_tokenizer(path, chat_template=str(template))
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        body = {"model": path.name, "messages": messages, "tools": TOOLS, "max_tokens": 8}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert r["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages, tools=TOOLS, tokenize=True))
        msg = r["choices"][0]["message"]
        assert msg["reasoning"] == msg["reasoning_content"] and msg["reasoning_content"]  # the prompt opened think
        stream = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in stream.splitlines()
                  if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
        off = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            **body, "chat_template_kwargs": {"thinking": False}}).json()
        assert off["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages, tokenize=True, thinking=False))
        assert off["choices"][0]["message"].get("reasoning_content") is None  # "response" opened: all content
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert f"(kimi_k3, float32, cpu) at http://127.0.0.1:{port}/v1" in err
