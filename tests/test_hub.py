"""Models by Hugging Face Hub id (kimi_lm.hub), offline: a Hub cache laid out by hand for resolution, and a local
HTTP server standing in for the Hub (tests/fake_hub.py) for downloads, progress, resume and errors."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

import kimi_lm
from fake_hub import FakeHub, Repo, populate_cache
from kimi_lm import hub
from kimi_lm.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD = "model-00001-of-00001.safetensors"
# what kimi-lm reads; build.json and loss.png because SHA256SUMS lists them (verify checks them)
WANTED = {"config.json", SHARD, "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
          "chat_template.jinja", "SHA256SUMS", "build.json", "loss.png"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, bytes]:
    """The bundled tiny model as a Hub repository holds it, with SHA256SUMS."""
    from kimi_lm.verify import write_sums

    d = tmp_path_factory.mktemp("tiny")
    for p in kimi_lm.DEFAULT_MODEL.iterdir():
        shutil.copy(p, d / p.name)
    write_sums(d, progress=False)
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache of this test's own; huggingface_hub's other state kept out of the user's HF_HOME."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)  # resume granularity: 1 MiB, not 10
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    return tmp_path / "hub"


@pytest.fixture
def fake_hub(cache, monkeypatch, model_files):
    with FakeHub() as server:
        server.repos["org/tiny"] = Repo(dict(model_files, **{
            "README.md": b"# tiny", "original/model.safetensors": b"x" * 1000, "pytorch_model.bin": b"y" * 1000}))
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield server


@pytest.fixture
def offline(cache, monkeypatch, model_files):
    """HF_HUB_OFFLINE=1 with org/tiny in the cache, as a download left it."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return populate_cache(cache, "org/tiny", model_files, COMMIT)


def downloaded(server) -> set[str]:
    return {p.split("/resolve/")[1].split("/", 1)[1] for m, p, _ in server.log if m == "GET" and "/resolve/" in p}


# ---- resolution: which strings are Hub ids, local paths first, the cache offline ---------------------------------
def test_hub_ids_and_paths():
    assert hub.parse_id("moonshotai/Kimi-Linear-48B-A3B-Instruct") == ("moonshotai/Kimi-Linear-48B-A3B-Instruct", None)
    assert hub.parse_id("mlx-community/Kimi-Linear-4bit@v1.0") == ("mlx-community/Kimi-Linear-4bit", "v1.0")
    assert hub.parse_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for not_an_id in ("tiny", "/abs/dir", "./org/name", "a/b/c", "org/", "~/models/x", "org/na me", "configs/k2.json"):
        assert hub.parse_id(not_an_id) is None, not_an_id


def test_a_local_path_always_wins(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(kimi_lm.DEFAULT_MODEL, tmp_path / "org" / "tiny")
    assert hub.resolve("org/tiny") == Path("org/tiny")
    assert hub.resolve(Path("org/other")) == Path("org/other")  # a Path is never a Hub id
    assert hub.resolve("tiny") == Path("tiny")


def test_every_entry_point_resolves_from_the_cache_offline(offline, tmp_path, capsys):
    from kimi_lm.convert import main as convert
    from kimi_lm.estimate import main as estimate
    from kimi_lm.generate import main as generate
    from kimi_lm.verify import main as verify

    assert kimi_lm.load("org/tiny", backend=None).config.vocab_size == 4352  # the bundled model's
    assert kimi_lm.load_tokenizer(f"org/tiny@{COMMIT}").encode("def f(): pass")
    assert kimi_lm.estimate("org/tiny").model == "org/tiny"
    assert estimate(["org/tiny", "--json"]) == 0 and json.loads(capsys.readouterr().out)["model"] == "org/tiny"
    assert generate(["--model", "org/tiny", "--prompt", "def", "-m", "3"]) == 0
    assert verify(["org/tiny", "--quiet"]) == 0 and "org/tiny: all 8 file(s) match" in capsys.readouterr().out
    assert convert(["org/tiny", str(tmp_path / "out"), "--dequantize", "--quiet"]) == 2  # found, and read:
    assert "nothing to dequantize" in capsys.readouterr().err


def test_train_takes_config_and_tokenizer_by_hub_id(offline, cache, tmp_path, capsys):
    from kimi_lm.config import preset
    from kimi_lm.train import train as trainer

    tok = kimi_lm.load_tokenizer("org/tiny")
    cfg = trainer.build_config(str(hub.resolve("org/tiny", ("config",))), tok, None)
    assert cfg.hidden_size == json.loads((offline / "config.json").read_text())["hidden_size"]
    # through the command (a K2 config, refused after both were resolved: no training run needed)
    populate_cache(cache, "org/k2", {"config.json": json.dumps(preset("tiny-k2").to_dict()).encode()}, COMMIT)
    (tmp_path / "data.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    args = ["--config", "org/k2", "--tokenizer", "org/tiny", "--data", str(tmp_path / "data.txt"),
            "--out", str(tmp_path / "run"), "--quiet"]
    assert trainer.main(args) == 2
    assert "/models--org--k2/snapshots/" in (err := capsys.readouterr().err)
    assert "kimi-lm train trains Kimi Linear and Kimi K3 models; this is deepseek_v3" in err


def test_offline_with_nothing_cached_is_one_clear_error(cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"org/absent: offline mode is on \(HF_HUB_OFFLINE=1\), and it is not in "
                                              r"the Hub cache .*`kimi-lm download org/absent`"):
        kimi_lm.load("org/absent")


# ---- downloads from a stand-in Hub --------------------------------------------------------------------------------
def test_download_fetches_only_what_kimi_lm_reads_then_reuses_the_cache(fake_hub, cache, capsys, model_files):
    from kimi_lm.download import main

    assert main(["org/tiny"]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path == cache / "models--org--tiny" / "snapshots" / COMMIT
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == COMMIT
    assert {p.name for p in path.iterdir()} == WANTED and downloaded(fake_hub) == WANTED
    assert all((path / n).read_bytes() == model_files[n] for n in WANTED)
    assert "Downloading org/tiny: 15.4" in err and "Fetching 9 files: 100%" in err  # the announcement, the bar

    fake_hub.log.clear()
    assert kimi_lm.load("org/tiny", backend=None) is not None and main(["org/tiny"]) == 0
    assert downloaded(fake_hub) == set()  # all from the cache: only the commit and file list were asked for
    assert Path(capsys.readouterr().out.strip()) == path


def test_a_broken_transfer_resumes_with_a_range_request(fake_hub, model_files):
    fake_hub.repos["org/tiny"].drop_once = {SHARD}  # the first GET of the shard stops halfway
    path = hub.resolve("org/tiny")
    (first, resumed) = fake_hub.gets(SHARD)
    assert first is None and resumed.startswith("bytes=") and 0 < int(resumed[6:-1]) < len(model_files[SHARD])
    assert (path / SHARD).read_bytes() == model_files[SHARD]


def test_a_second_run_fetches_only_the_missing_files(fake_hub):
    kimi_lm.load_tokenizer("org/tiny")  # config and tokenizer only
    assert downloaded(fake_hub) == {"config.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"}
    fake_hub.log.clear()
    kimi_lm.load("org/tiny", backend=None)
    assert downloaded(fake_hub) == {SHARD, "model.safetensors.index.json", "SHA256SUMS", "build.json", "loss.png"}


def test_large_downloads_are_announced_and_asked_about(fake_hub, monkeypatch, capsys):
    from kimi_lm.download import main

    monkeypatch.setattr(hub, "ASK_ABOVE", 1 << 20)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # a script: no terminal to ask on
    assert main(["org/tiny"]) == 2
    err = capsys.readouterr().err
    assert "org/tiny (revision main, commit 01234567): 15.4" in err and "to download in 7 file(s) (1.83 KiB already cached)" in err
    assert "kimi_lm.estimate: " in err and "to run it" in err and "GiB RAM: fits" in err
    assert "without confirmation, and there is no terminal to ask on; pass --yes" in err
    assert downloaded(fake_hub) == {"config.json", "SHA256SUMS"}  # the config checked, the sums read; no weights

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert main(["org/tiny"]) == 2 and "download declined; nothing was downloaded" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert main(["org/tiny"]) == 0 and "Download 15.4" in capsys.readouterr().err and SHARD in downloaded(fake_hub)


def test_yes_and_the_python_api_do_not_ask(fake_hub, monkeypatch, capsys, tmp_path):
    from kimi_lm.convert import main

    monkeypatch.setattr(hub, "ASK_ABOVE", 1 << 20)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert kimi_lm.load("org/tiny", backend=None) is not None  # announced, not asked: as transformers does
    assert "to download in" in capsys.readouterr().err
    fake_hub.repos["org/two"] = fake_hub.repos["org/tiny"]
    assert main(["org/two", str(tmp_path / "out"), "--dequantize", "--yes"]) == 2  # downloaded, then read:
    err = capsys.readouterr().err
    assert "to download in" in err and "nothing to dequantize" in err
    assert fake_hub.gets(SHARD) == [None, None]  # once for org/tiny, once for org/two


# ---- errors: one line each, never a traceback ---------------------------------------------------------------------
def test_unknown_repo_and_revision(fake_hub, capsys):
    from kimi_lm.generate import main

    with pytest.raises(CheckpointError, match=r"org/nope: no such local directory, and no model org/nope on the "
                                              r"Hugging Face Hub \(http://127.*; .* set HF_TOKEN"):
        kimi_lm.load("org/nope")
    with pytest.raises(CheckpointError, match=r"org/tiny@v9: org/tiny has no revision 'v9'"):
        kimi_lm.load("org/tiny@v9")
    assert main(["--model", "org/nope", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kimi-lm generate: error: org/nope: no such local directory") and err.count("\n") == 1


def test_gated_repo_needs_a_token(fake_hub, monkeypatch, model_files):
    fake_hub.repos["org/gated"] = Repo(dict(model_files), gated=True)
    with pytest.raises(CheckpointError, match=r"org/gated: a gated model and no Hugging Face token is set: accept "
                                              r"its conditions at http://.*/org/gated, then log in .* or set HF_TOKEN"):
        kimi_lm.load_tokenizer("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(CheckpointError, match="your token has no access to it yet"):
        kimi_lm.load_tokenizer("org/gated")
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    assert kimi_lm.load_tokenizer("org/gated").encode("x")


def test_repos_that_are_not_supported_models_fail_before_the_weights(fake_hub):
    big = b"\0" * (1 << 20)
    fake_hub.repos["org/llama"] = Repo({"config.json": json.dumps({"model_type": "llama"}).encode(),
                                        "model.safetensors": big, "tiktoken.model": b""})
    fake_hub.repos["org/gguf"] = Repo({"README.md": b"", "model-Q4_K_M.gguf": big})
    fake_hub.repos["org/bin"] = Repo({"config.json": b"{}", "pytorch_model.bin": big, "tiktoken.model": b""})
    with pytest.raises(CheckpointError, match=r"org/llama: not a model kimi-lm can run: .*llama"):
        kimi_lm.load("org/llama")
    with pytest.raises(CheckpointError, match=r"org/gguf: not a model kimi-lm can run: the repository has no "
                                              r"config.json, tiktoken.model \(Kimi's tokenizer\), \*.safetensors"):
        kimi_lm.load("org/gguf")
    with pytest.raises(CheckpointError, match=r"org/bin: .* has no \*.safetensors weights"):
        kimi_lm.load("org/bin")
    assert downloaded(fake_hub) == {"config.json"}  # llama's, to read its model_type; nothing else


def test_no_network_uses_the_cache_or_says_so(cache, monkeypatch, model_files, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(CheckpointError, match=r"org/tiny: the Hugging Face Hub \(http://127.*\) cannot be reached "
                                              r"\(.*\), and it is not in the Hub cache .*; connect to the network"):
        hub.resolve("org/tiny")
    snapshot = populate_cache(cache, "org/tiny", model_files, COMMIT)
    assert hub.resolve("org/tiny") == snapshot
    assert "cannot be reached" in capsys.readouterr().err


# ---- the command, with the real environment variables -------------------------------------------------------------
def test_cli_download_honours_hf_home_endpoint_token_and_offline(fake_hub, tmp_path, model_files):
    fake_hub.repos["org/gated"] = Repo(dict(model_files), gated=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=fake_hub.url, HF_TOKEN=fake_hub.token,
               PYTHONPATH=str(Path(kimi_lm.__file__).parents[1]))
    cli = [sys.executable, "-m", "kimi_lm"]
    out = subprocess.run([*cli, "download", "org/gated"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "hf" / "hub" / "models--org--gated" / "snapshots" / COMMIT
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # offline: the cache under HF_HOME alone
    out = subprocess.run([*cli, "estimate", "org/gated", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["weights_source"] == "shards", out.stderr
