"""Generation on a tiny random checkpoint: greedy = step-by-step argmax of full forwards, chunked prefill, stops,
sliding-window MLA cache, and the `generate` / `chat` commands end to end (thinking shown apart, a tiny Kimi K3
release-layout checkpoint with scripted tool-call replies, ``--chat-template`` files)."""

import importlib
import io
import os
import subprocess
import sys

import pytest
import torch

import kimi_lm
from conftest import rel_err
from kimi_lm.cli import main as cli_main
from kimi_lm.chat import ChatDelta, ToolCall, parse_reply
from kimi_lm.generate import ReplyPrinter, prefill
from kimi_lm.prompt_cache import RotatingMLACache, make_cache
from serving import ScriptedModel
from tiny_chat import XTML_JINJA, chat_checkpoint, ckpt, k3_chat_checkpoint, model, one_thread, tok  # noqa: F401 (fixtures)



@pytest.fixture(scope="module")
def prompt(tok):
    return tok.apply_chat_template([{"role": "user", "content": "Hello world! Tell me 12345 things."}], tokenize=True)


def test_greedy_equals_argmax_of_full_forward_step_by_step(model, tok, prompt):
    responses = []
    for r in kimi_lm.stream_generate(model, tok, prompt, max_tokens=12, stop_token_ids=[], prefill_step_size=7,
                                     logprobs=3):
        assert torch.is_grad_enabled()  # the generator's no_grad never leaks into the caller between tokens
        responses.append(r)
    assert len(responses) == 12 and responses[-1].finish_reason == "length"
    ids = list(prompt)
    with torch.no_grad():
        for r in responses:
            logits = model(torch.tensor([ids]))[0, -1]
            assert r.token == int(logits.argmax())
            assert r.logprob == pytest.approx(float(logits.log_softmax(-1)[r.token]), abs=1e-4)
            assert r.top_logprobs[0] == (r.token, pytest.approx(r.logprob)) and len(r.top_logprobs) == 3
            ids.append(r.token)
    assert "".join(r.text for r in responses) == tok.decode(ids[len(prompt):])


def test_repetition_penalty_sees_prompt_and_generated_tokens(model, tok, prompt):
    kw = dict(repetition_penalty=3.0, repetition_context_size=6)
    out = [r.token for r in kimi_lm.stream_generate(model, tok, prompt, max_tokens=10, stop_token_ids=[], **kw)]
    ids = list(prompt)
    with torch.no_grad():
        for token in out:  # oracle: full forward, penalise the last 6 ids by hand, argmax
            logits = model(torch.tensor([ids]))[0, -1]
            for i in set(ids[-6:]):
                logits[i] = logits[i] / 3.0 if logits[i] > 0 else logits[i] * 3.0
            assert token == int(logits.argmax())
            ids.append(token)
    assert out != [r.token for r in kimi_lm.stream_generate(model, tok, prompt, max_tokens=10, stop_token_ids=[])]


def test_chunked_prefill_gives_the_one_pass_logits(model, prompt):
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0, -1]
        for step in (1, 5, len(prompt)):
            assert rel_err(prefill(model, model.make_cache(1), prompt, step), full) < 1e-5  # of the largest logit


def test_stop_token_ends_generation_and_is_not_emitted(model, tok, prompt):
    greedy = [r.token for r in kimi_lm.stream_generate(model, tok, prompt, max_tokens=6, stop_token_ids=[])]
    stop = greedy[3]
    first = greedy.index(stop)
    out = list(kimi_lm.stream_generate(model, tok, prompt, max_tokens=6, stop_token_ids=[stop]))
    assert len(out) == first + 1 and out[-1].finish_reason == "stop" and out[-1].token == stop
    assert "".join(r.text for r in out) == tok.decode(greedy[:first])


def test_stop_string_is_not_emitted_even_across_tokens(model, tok, prompt):
    deltas = [r.text for r in kimi_lm.stream_generate(model, tok, prompt, max_tokens=20, stop_token_ids=[])]
    i = next(i for i in range(2, len(deltas) - 1) if len(deltas[i]) >= 2 and len(deltas[i + 1]) >= 2)
    stop = deltas[i][-2:] + deltas[i + 1][:2]  # spans two tokens
    full = "".join(deltas)
    out = list(kimi_lm.stream_generate(model, tok, prompt, max_tokens=20, stop_token_ids=[], stop=[stop]))
    assert "".join(r.text for r in out) == full[: full.index(stop)] and out[-1].finish_reason == "stop"
    assert len(out) <= i + 2


def test_seeded_sampling_is_reproducible(model, tok, prompt):
    kw = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=123, stop_token_ids=[])
    assert kimi_lm.generate(model, tok, prompt, **kw) == kimi_lm.generate(model, tok, prompt, **kw)


def test_ids_past_the_embedding_are_refused(model, tok):
    n = tok.num_base_tokens
    assert model.config.vocab_size == n + 256  # like Kimi Linear: the last two special ids have no embedding
    with pytest.raises(ValueError, match=f"prompt token id {n + 256}"):
        kimi_lm.generate(model, tok, f"hi<|reserved_token_{n + 256}|>")


def test_rotating_mla_cache_keeps_exactly_the_last_n_latents():
    cache = RotatingMLACache(1, 3, max_size=5, dtype=torch.float32)
    seen = []
    for t in [4, 1, 1, 7, 1, 1, 300, 2, 1]:  # includes a chunk longer than the window
        new = torch.arange(len(seen), len(seen) + t, dtype=torch.float32).view(1, t, 1).expand(1, t, 3)
        kept = [x[0] for x in seen[-5:]]
        window = cache.append(new)
        seen += [(float(v),) for v in range(len(seen), len(seen) + t)]
        assert window[0, :, 0].tolist() == kept + [float(v) for v in range(len(seen) - t, len(seen))]
        assert cache.length == min(5, len(seen)) and cache.nbytes == cache.length * 3 * 4


def test_max_kv_size_is_exact_below_the_window_and_bounded_above(model, tok, prompt):
    kw = dict(max_tokens=8, stop_token_ids=[])
    assert kimi_lm.generate(model, tok, prompt, max_kv_size=len(prompt) + 8, **kw) == kimi_lm.generate(
        model, tok, prompt, **kw)
    cache = make_cache(model, 1, max_kv_size=6)
    with torch.no_grad():
        prefill(model, cache, prompt, 4)
    mla = [c for c in cache.layers if isinstance(c, RotatingMLACache)]
    assert mla and all(c.length == 6 for c in mla)


# ---- commands -------------------------------------------------------------------------------------------------------
def test_generate_command_end_to_end(ckpt):
    run = subprocess.run([sys.executable, "-m", "kimi_lm.cli", "generate", "--model", str(ckpt), "--prompt", "Hello",
                          "--max-tokens", "5", "--temp", "0.7", "--seed", "1", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "Prompt: " in run.stderr and "tokens-per-sec" in run.stderr and "Peak memory:" in run.stderr
    assert "Generation: " in run.stderr


@pytest.mark.slow  # a second interpreter start (~3 s of torch import); the in-process test below covers the logic
def test_bad_model_path_is_one_line_in_a_real_process(tmp_path):
    run = subprocess.run([sys.executable, "-m", "kimi_lm.cli", "generate", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "nope" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--temp", "-1"], "temperature"),
    (["--max-tokens", "abc"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--top-p", "0"], "top_p"),
    (["--max-kv-size", "0"], "--max-kv-size"),
    (["--dtype", "int8"], "dtype"),
    (["--prompt-cache-file", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
])
def test_bad_flag_values_are_one_line_and_exit_2(ckpt, capsys, flags, needle):
    assert cli_main(["generate", "--model", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kimi-lm generate: error:") and needle in err


def test_chat_repl_keeps_history_and_resets(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again\n/reset\nHello there\n/exit\n"))
    assert cli_main(["chat", "--model", str(ckpt), "--max-tokens", "4", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    replies = [line for line in out.split(">> ")[1:]]
    assert len(replies) == 5 and "[history cleared]" in replies[2]
    assert replies[0] == replies[3]  # same first turn after /reset: history was cleared, cache reuse is exact


def test_generate_defaults_to_the_bundled_model(capsys):
    """The README's main-job command: no --model means the tiny model shipped inside the package."""
    assert cli_main(["generate", "--prompt", 'Explain the "while" statement.', "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip()) > 0


# ---- thinking in generate / chat ------------------------------------------------------------------------------------
def _printed(deltas, **kw):
    out = io.StringIO()
    printer = ReplyPrinter(out, **kw)
    for d in deltas:
        printer.show(d)
    printer.finish()
    return out.getvalue()


THOUGHT = [ChatDelta(reasoning="hmm "), ChatDelta(reasoning="ok"), ChatDelta(content="Answer."),
           ChatDelta(tool_calls=[ToolCall("functions.f:0", "f", "{}")])]


def test_reply_printer_shows_thinking_apart():
    assert _printed(THOUGHT, tty=False) == "[thinking]\nhmm ok\n[/thinking]\nAnswer.\n[tool call functions.f:0 {}]\n\n"
    assert _printed(THOUGHT, tty=True) == "\x1b[2mhmm ok\x1b[0m\n\nAnswer.\n[tool call functions.f:0 {}]\n\n"
    assert _printed(THOUGHT, tty=False, hide_thinking=True) == "Answer.\n[tool call functions.f:0 {}]\n\n"
    assert _printed([ChatDelta(reasoning="cut off")], tty=False) == "[thinking]\ncut off\n[/thinking]\n\n"


@pytest.fixture(scope="module")
def k3_ckpt(tmp_path_factory):
    return k3_chat_checkpoint(tmp_path_factory)


def test_generate_on_a_k3_checkpoint_renders_xtml_and_splits_thinking(k3_ckpt, capsys):
    k3 = kimi_lm.load_tokenizer(k3_ckpt)
    flags = ["generate", "--model", str(k3_ckpt), "--prompt", "hello", "--max-tokens", "6", "--dtype", "float32"]
    ids = k3.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    assert cli_main(flags) == 0
    out, err = capsys.readouterr()
    assert f"Prompt: {len(ids)} tokens" in err
    # the prompt opened the think channel: a random model's reply is all thinking, shown in a [thinking] block
    text = kimi_lm.generate(kimi_lm.load(k3_ckpt, dtype=torch.float32), k3, ids, max_tokens=6, temperature=0)
    reasoning = parse_reply(k3, text, ids).get("reasoning_content", "")
    assert out == (f"[thinking]\n{reasoning}\n[/thinking]\n\n" if reasoning else "\n")
    assert cli_main(flags + ["--hide-thinking"]) == 0
    assert capsys.readouterr().out == "\n"
    off = k3.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True, thinking=False)
    assert cli_main(flags + ["--chat-template-config", '{"thinking": false}']) == 0
    assert f"Prompt: {len(off)} tokens" in capsys.readouterr().err
    assert cli_main(flags + ["--chat-template-config", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_chat_on_a_k3_checkpoint_keeps_reasoning_in_history(k3_ckpt, monkeypatch, capsys):
    from kimi_lm import chat_repl

    seen = []
    real = chat_repl._reply

    def spy(model, tokenizer, messages, pc, kwargs, args):
        message = real(model, tokenizer, messages, pc, kwargs, args)
        seen.append(message)
        return message

    monkeypatch.setattr(chat_repl, "_reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/exit\n"))
    assert cli_main(["chat", "--model", str(k3_ckpt), "--max-tokens", "4", "--dtype", "float32"]) == 0
    assert len(seen) == 2 and all(m["role"] == "assistant" and "<|" not in m["content"] for m in seen)
    assert all("reasoning_content" in m or m["content"] for m in seen)


# ---- Kimi K3: scripted replies (a random model never calls a tool by itself), --chat-template ----------------------
K3_REPLY = ('Need the weather.<|close|>think<|sep|><|open|>response<|sep|>Checking.<|close|>response<|sep|>'
            '<|open|>tools<|sep|><|open|>call tool="get_weather" index="1"<|sep|>'
            '<|open|>argument key="city" type="string"<|sep|>Paris<|close|>argument<|sep|><|close|>call<|sep|>'
            '<|close|>tools<|sep|><|close|>message<|sep|><|end_of_msg|>')


def _scripted_k3(monkeypatch, module, ckpt, reply: str) -> ScriptedModel:
    """Make ``module``'s command load the K3 checkpoint wrapped so that it replies ``reply`` (then EOS)."""
    tok = kimi_lm.load_tokenizer(ckpt)
    scripted = ScriptedModel(kimi_lm.load(ckpt, dtype=torch.float32), tok.encode(reply))
    monkeypatch.setattr(module, "load_model_and_tokenizer", lambda args: (scripted, tok))
    return scripted


def test_k3_checkpoint_is_the_release_layout_of_a_real_k3(k3_ckpt):
    from kimi_lm.model.kimi_k3 import KimiK3ForCausalLM

    assert type(kimi_lm.load(k3_ckpt, dtype=torch.float32)) is KimiK3ForCausalLM
    assert any(p.name.startswith("model-00002-of-00002") for p in k3_ckpt.iterdir())


def test_generate_k3_prints_thinking_answer_and_tool_call(k3_ckpt, monkeypatch, capsys):
    generate_module = importlib.import_module("kimi_lm.generate")  # kimi_lm.generate is also the function

    _scripted_k3(monkeypatch, generate_module, k3_ckpt, K3_REPLY)
    assert cli_main(["generate", "--model", str(k3_ckpt), "--prompt", "Weather in Paris?", "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert out == ('[thinking]\nNeed the weather.\n[/thinking]\nChecking.\n'
                   '[tool call functions.get_weather:0 {"city": "Paris"}]\n\n')


def test_chat_k3_keeps_tool_calls_and_reasoning_in_the_history(k3_ckpt, monkeypatch, capsys):
    from kimi_lm import chat_repl

    _scripted_k3(monkeypatch, chat_repl, k3_ckpt, K3_REPLY)
    seen = []
    real = chat_repl._reply

    def spy(model, tokenizer, messages, pc, kwargs, args):
        seen.append([dict(m) for m in messages])
        return real(model, tokenizer, messages, pc, kwargs, args)

    monkeypatch.setattr(chat_repl, "_reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Weather in Paris?\nand tomorrow?\n/exit\n"))
    assert cli_main(["chat", "--model", str(k3_ckpt), "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    # call ids are numbered across the conversation: the second turn's call is :1
    assert out.count('[tool call functions.get_weather:0 {"city": "Paris"}]') == 1
    assert out.count('[tool call functions.get_weather:1 {"city": "Paris"}]') == 1
    reply = seen[1][1]
    assert reply == {"role": "assistant", "content": "Checking.", "reasoning_content": "Need the weather.",
                     "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    # the second turn renders the first reply back in XTML: its thinking, answer and typed call arguments
    text = kimi_lm.load_tokenizer(k3_ckpt).apply_chat_template(seen[1])
    assert ('<|open|>think<|sep|>Need the weather.<|close|>think<|sep|><|open|>response<|sep|>Checking.'
            '<|close|>response<|sep|><|open|>tools<|sep|><|open|>call tool="get_weather" index="1"<|sep|>'
            '<|open|>argument key="city" type="string"<|sep|>Paris<|close|>argument<|sep|>') in text




def test_chat_template_file_replaces_the_checkpoints_format(k3_ckpt, tmp_path, capsys):
    template = tmp_path / "xtml.jinja"
    template.write_text(XTML_JINJA)
    k3 = kimi_lm.load_tokenizer(k3_ckpt)
    flags = ["generate", "--model", str(k3_ckpt), "--prompt", "hello", "--max-tokens", "6", "--chat-template",
             str(template)]
    expected = '<|open|>message role="user"<|sep|>hello<|close|>message<|sep|><|end_of_msg|>'
    custom = kimi_lm.load_tokenizer(k3_ckpt, chat_template=str(template))
    assert custom.chat_format == "xtml" and custom.render_template
    assert custom.apply_chat_template([{"role": "user", "content": "hello"}]) == (
        expected + '<|open|>message role="assistant"<|sep|><|open|>think<|sep|>')
    assert cli_main(flags) == 0
    out, err = capsys.readouterr()
    ids = k3.encode(expected + '<|open|>message role="assistant"<|sep|><|open|>think<|sep|>')
    assert f"Prompt: {len(ids)} tokens" in err  # not the built-in renderer's (thinking-effort message and all)
    assert len(ids) != len(k3.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True))
    # thinking off: the template opens "response", so the reply is content, printed as is
    assert cli_main(flags + ["--chat-template-config", '{"thinking": false}']) == 0
    out, err = capsys.readouterr()
    ids = k3.encode(expected + '<|open|>message role="assistant"<|sep|><|open|>response<|sep|>')
    text = kimi_lm.generate(kimi_lm.load(k3_ckpt, dtype=torch.float32), k3, ids, max_tokens=6, temperature=0)
    assert f"Prompt: {len(ids)} tokens" in err and out == parse_reply(custom, text, ids)["content"] + "\n"
    assert "[thinking]" not in out


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_chat_template_that_does_not_parse_names_the_file(k3_ckpt, tmp_path, capsys, command):
    bad = tmp_path / "broken.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n")
    assert cli_main([command, "--model", str(k3_ckpt), "--chat-template", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kimi-lm {command}: error: chat template {bad}: not a valid Jinja template (line 2:")
    assert err.count("\n") == 1
    assert cli_main([command, "--model", str(k3_ckpt), "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert "missing.jinja" in capsys.readouterr().err

