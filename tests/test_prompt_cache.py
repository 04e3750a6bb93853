"""Prompt caches: a hit gives exactly the cold run's tokens — through a file, on a shared prefix, after divergence —
and the trap (cutting MLA while keeping a KDA state from further on) is shown to be a real difference."""

import pytest
import torch

import kimi_lm
from kimi_lm.cache import KDACache
from kimi_lm.cli import main as cli_main
from kimi_lm.generate import prefill
from kimi_lm.prompt_cache import PromptCache, PromptCacheError, load_prompt_cache, save_prompt_cache
from tiny_chat import chat_checkpoint, ckpt, model, one_thread, tok  # noqa: F401 (fixtures; one_thread autouse)

GREEDY = dict(max_tokens=8, stop_token_ids=[], prefill_step_size=16)



@pytest.fixture(scope="module")
def doc(tok):
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "漢字 12345."
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=False, tokenize=True)


def _run(model, tok, ids, **kw):
    rs = list(kimi_lm.stream_generate(model, tok, ids, **GREEDY, **kw))
    return [r.token for r in rs], [r.logprob for r in rs], rs[0].prompt_cached


def test_cache_file_hit_equals_cold_run(model, tok, doc, tmp_path):
    pc = PromptCache(model)
    with torch.no_grad():
        pc.advance(doc, prefill(model, pc.cache, doc, 16))
    save_prompt_cache(tmp_path / "c.safetensors", pc)
    question = tok.encode("<|im_user|>user<|im_middle|>Summarise.<|im_end|><|im_assistant|>assistant<|im_middle|>")
    loaded = load_prompt_cache(tmp_path / "c.safetensors", model)
    assert loaded.tokens == doc and loaded.cache.offset == len(doc)
    hit = _run(model, tok, doc + question, prompt_cache=loaded)
    cold = _run(model, tok, doc + question)
    assert hit[2] == len(doc) and cold[2] == 0
    assert hit[0] == cold[0]
    assert hit[1] == pytest.approx(cold[1], abs=1e-4)


def test_prompt_equal_to_the_cache_needs_no_prefill(model, tok, doc, tmp_path):
    pc = PromptCache(model)
    with torch.no_grad():
        pc.advance(doc, prefill(model, pc.cache, doc, 16))
    save_prompt_cache(tmp_path / "c.safetensors", pc)
    hit = _run(model, tok, doc, prompt_cache=load_prompt_cache(tmp_path / "c.safetensors", model))
    assert hit[2] == len(doc) and hit[0] == _run(model, tok, doc)[0]


def test_shared_prefix_resumes_from_the_snapshot_not_the_live_state(model, tok, doc):
    pc = PromptCache(model)
    first = _run(model, tok, doc, prompt_cache=pc)  # leaves a snapshot at len(doc), live state further on
    assert len(pc.tokens) == len(doc) + GREEDY["max_tokens"] - 1 and len(doc) in pc.snapshots
    other = doc + tok.encode(" Different continuation")
    assert other[len(doc)] != first[0][0]  # diverges right after the shared prefix
    hit = _run(model, tok, other, prompt_cache=pc)
    cold = _run(model, tok, other)
    assert hit[2] == len(doc) and hit[0] == cold[0] and hit[1] == pytest.approx(cold[1], abs=1e-4)


def test_snapshots_survive_the_file(model, tok, doc, tmp_path):
    pc = PromptCache(model)
    _run(model, tok, doc, prompt_cache=pc)
    save_prompt_cache(tmp_path / "s.safetensors", pc)
    loaded = load_prompt_cache(tmp_path / "s.safetensors", model)
    assert sorted(loaded.snapshots) == [len(doc)] and loaded.tokens == pc.tokens
    other = doc + tok.encode(" Different continuation")
    hit = _run(model, tok, other, prompt_cache=loaded)
    assert hit[2] == len(doc) and hit[0] == _run(model, tok, other)[0]


def test_divergence_before_any_snapshot_starts_cold(model, tok, doc):
    pc = PromptCache(model)
    _run(model, tok, doc, prompt_cache=pc)
    shorter = doc[:10] + tok.encode("Fresh start")  # shares 10 tokens, but no state was saved at 10
    hit = _run(model, tok, shorter, prompt_cache=pc)
    assert hit[2] == 0 and hit[0] == _run(model, tok, shorter)[0]


def test_the_trap_cutting_mla_but_keeping_a_later_kda_state_changes_the_logits(model, tok, doc):
    # What a naive "trim to the common prefix" does on a hybrid model: the check above would catch it.
    extra = tok.encode(" Different continuation")
    with torch.no_grad():
        cold = prefill(model, model.make_cache(1), doc + extra, 16)
        cache = model.make_cache(1)
        prefill(model, cache, doc + tok.encode(" something else first"), 16)
        for layer in cache.layers:
            if not isinstance(layer, KDACache):
                layer.length = len(doc)
        cache.offset = len(doc)
        naive = prefill(model, cache, extra, 16)
    assert (naive - cold).abs().max() > 1e-2 * cold.abs().max()


def test_chat_turns_reuse_the_cache_exactly(model, tok):
    pc = PromptCache(model)
    messages = [{"role": "user", "content": "Hello world!"}]
    for turn in range(3):
        ids = tok.apply_chat_template(messages, tokenize=True)
        hit = _run(model, tok, ids, prompt_cache=pc)
        assert hit[0] == _run(model, tok, ids)[0]
        assert (hit[2] > 0) == (turn > 0)
        messages += [{"role": "assistant", "content": tok.decode(hit[0])}, {"role": "user", "content": "More 123."}]


def test_sliding_window_cache_round_trips_through_a_file(model, tok, doc, tmp_path):
    pc = PromptCache(model, max_kv_size=12)
    with torch.no_grad():
        pc.advance(doc, prefill(model, pc.cache, doc, 16))
    save_prompt_cache(tmp_path / "w.safetensors", pc)
    more = tok.encode(" And then?")
    loaded = load_prompt_cache(tmp_path / "w.safetensors", model)
    assert loaded.max_kv_size == 12
    assert _run(model, tok, doc + more, prompt_cache=loaded)[0] == _run(model, tok, doc + more, prompt_cache=pc)[0]


# ---- bad files ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(model, doc, tmp_path_factory):
    pc = PromptCache(model)
    with torch.no_grad():
        pc.advance(doc, prefill(model, pc.cache, doc, 16))
    path = tmp_path_factory.mktemp("pc") / "c.safetensors"
    save_prompt_cache(path, pc)
    return path


def test_cache_from_another_model_is_refused(saved, ckpt, tmp_path_factory):
    other_weights = kimi_lm.load(chat_checkpoint(tmp_path_factory, seed=1), dtype=torch.float32)
    other_dtype = kimi_lm.load(ckpt, dtype=torch.bfloat16)
    for other in (other_weights, other_dtype):
        with pytest.raises(PromptCacheError, match="c.safetensors: this prompt cache was made with a different model"):
            load_prompt_cache(saved, other)


def test_cache_of_an_earlier_version_is_refused_with_what_to_do(saved, model, tmp_path):
    """Version 1 files hashed the model in state_dict order: refused by version, not as another model's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(saved, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "old.safetensors", metadata={**meta, "version": "1"})
    with pytest.raises(PromptCacheError, match=r"old.safetensors: prompt cache version '1', this kimi-lm reads '2'; "
                                               r"make it again with `kimi-lm cache-prompt`"):
        load_prompt_cache(tmp_path / "old.safetensors", model)


def test_corrupt_and_truncated_files_are_refused(saved, model, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(PromptCacheError, match="junk.safetensors: not a readable safetensors file"):
        load_prompt_cache(tmp_path / "junk.safetensors", model)
    data = saved.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PromptCacheError, match="cut.safetensors"):
        load_prompt_cache(tmp_path / "cut.safetensors", model)
    with pytest.raises(PromptCacheError, match="not found"):
        load_prompt_cache(tmp_path / "missing.safetensors", model)


def test_cli_cache_prompt_then_generate_equals_a_cold_run(ckpt, model, tok, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("The lazy dog sleeps. " * 4)
    out = tmp_path / "doc.safetensors"
    assert cli_main(["cache-prompt", "--model", str(ckpt), "--prompt-file", str(tmp_path / "doc.txt"),
                     "--out", str(out), "--dtype", "float32"]) == 0
    assert f"-> {out}" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(ckpt), "--prompt-cache-file", str(out), "--prompt", " Why?",
                     "--max-tokens", "6", "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    cached = tok.encode("<|im_user|>user<|im_middle|>" + "The lazy dog sleeps. " * 4)
    cold_ids = cached + tok.encode(" Why?<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert captured.out == kimi_lm.generate(model, tok, cold_ids, max_tokens=6) + "\n"
    assert f"({len(cached)} from the prompt cache)" in captured.err


def test_cli_refuses_a_corrupt_cache_in_one_line(ckpt, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    assert cli_main(["generate", "--model", str(ckpt), "--prompt-cache-file", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.safetensors" in err


def test_fingerprint_is_read_once_per_model(model, monkeypatch):
    """Each prompt cache (the server makes one per request) takes its model's fingerprint, which reads state_dict()
    (dense copies of every packed weight under the CPU backend): once per model object, not per cache."""
    from kimi_lm import prompt_cache

    monkeypatch.setattr(prompt_cache, "_fingerprints", type(prompt_cache._fingerprints)())
    reads = []
    real = prompt_cache._fingerprint
    monkeypatch.setattr(prompt_cache, "_fingerprint", lambda m: reads.append(m) or real(m))
    first, second = PromptCache(model), PromptCache(model)
    assert first.fingerprint == second.fingerprint == real(model)
    assert reads == [model]
    first.check_model(model)
    assert reads == [model]


def test_fingerprint_of_a_prepared_model_is_the_plain_models(tmp_path):
    """The CPU backend's modules give the same state_dict names, shapes and dtypes in another order, each packed
    weight as a dense copy: the fingerprint (taken by name) is the plain model's, and kimi_lm.cpu.prepare takes it
    before the swap, so no prompt cache densifies the weights."""
    import copy

    from kimi_lm import cpu, prompt_cache
    from kimi_lm.config import preset
    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

    torch.manual_seed(0)
    plain = KimiLinearForCausalLM(preset("tiny")).eval().requires_grad_(False)
    prepared = cpu.prepare(copy.deepcopy(plain))
    assert list(plain.state_dict()) != list(prepared.state_dict())  # the order the fingerprint must not depend on
    assert prompt_cache._fingerprint(prepared) == prompt_cache._fingerprint(plain)


def test_the_backend_takes_the_fingerprint_before_its_swaps(ckpt, monkeypatch):
    from kimi_lm import prompt_cache

    seen = []
    real = prompt_cache._fingerprint
    monkeypatch.setattr(prompt_cache, "_fingerprint", lambda m: seen.append(type(m.lm_head).__name__) or real(m))
    loaded = kimi_lm.load(ckpt, dtype=torch.float32)
    assert seen == ["Linear"]  # the plain module, before the backend packed it
    assert prompt_cache.model_fingerprint(loaded) == real(kimi_lm.load(ckpt, dtype=torch.float32, backend=None))
    assert len(seen) == 1  # once: the model's prompt caches reuse it
