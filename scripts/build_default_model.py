"""Rebuild the bundled default model (``kimi_lm/default_model/``) from scratch, on one CPU thread.

    python scripts/build_default_model.py                 # corpus -> BPE -> kimi-lm train -> bf16 export

1. Corpus: the Python language reference topics that ship with CPython (``pydoc_data.topics``, ~465k characters):
   each topic is one plain-text document, and each topic / section heading also becomes chat documents
   ("Explain the "while" statement." -> the section text), rendered with Kimi Linear's chat template, so that
   ``kimi-lm generate --prompt "..."`` (which applies the template) answers on topic.
2. Tokenizer: a 4096-token byte-level BPE trained on that corpus (``kimi_lm.train.bpe``: Hugging Face
   ``tokenizers``), written as ``tiktoken.model`` + ``tokenizer_config.json`` + ``chat_template.jinja``.
3. Model: a tiny Kimi Linear (d = 192, KDA:MLA 3:1 over 8 layers, dense first layer then MoE with 8 experts
   top-2 and a shared expert, Block AttnRes with 2-layer blocks: 8.0M parameters) trained with ``kimi-lm train``
   (Muon + AdamW, WSD) for 150 steps of 16 × 256 tokens (614k tokens, about 2 epochs).
4. Export: the final checkpoint in bf16, without optimizer state, swapped into ``kimi_lm/default_model/``
   atomically, with ``build.json`` recording the settings, wall time and final losses.

Deterministic given ``--seed`` (one thread: the same arithmetic every run).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "kimi_lm" / "default_model"
TEMPLATE = ROOT / "tests" / "data" / "kimi-linear-48b-a3b-instruct.chat_template.jinja"
QUESTIONS = ["Explain {}.", "What is {}?", "Tell me about {}.", "{}"]
ANSWER_CHARS = 1200  # chat answers are the first ~300 tokens of a section, ending at a paragraph break

# The architecture: 8 layers (KDA KDA KDA MLA)x2, MoE from layer 1, AttnRes blocks of 2 layers (4 sublayers).
CONFIG = {
    "model_type": "kimi_linear", "hidden_size": 192, "num_hidden_layers": 8, "intermediate_size": 512,
    "num_attention_heads": 3, "num_key_value_heads": 3, "kv_lora_rank": 96, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16, "v_head_dim": 32, "mla_use_nope": True, "num_experts": 8, "num_experts_per_token": 2,
    "num_shared_experts": 1, "moe_intermediate_size": 128, "first_k_dense_replace": 1, "routed_scaling_factor": 2.0,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attn_res_block_size": 2,
    "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "num_heads": 3,
                           "head_dim": 64, "short_conv_kernel_size": 4},
}

def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs of a reST-style topic: a heading is a line underlined by = - * ~ or ^."""
    parts = re.split(r"\n([^\n]+)\n[=\-*~^]{3,}\n", "\n" + text)
    return [(parts[i].strip(), parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2) if parts[i + 1].strip()]


def answer(body: str) -> str:
    if len(body) <= ANSWER_CHARS:
        return body
    cut = body.rfind("\n\n", 0, ANSWER_CHARS)
    return body[: cut if cut > ANSWER_CHARS // 3 else ANSWER_CHARS].rstrip()


def write_corpus(directory: Path, seed: int) -> dict:
    import pydoc_data.topics

    (directory / "topics").mkdir(parents=True)
    chats = []
    for key, text in sorted(pydoc_data.topics.topics.items()):
        (directory / "topics" / f"{key}.txt").write_text(text, encoding="utf-8")
        for heading, body in sections(text):
            heading = re.sub(r"^The ", "the ", heading)  # 'Explain the "while" statement.'
            for q in QUESTIONS:
                chats.append({"messages": [{"role": "user", "content": q.format(heading)},
                                           {"role": "assistant", "content": answer(body)}]})
    random.Random(seed).shuffle(chats)
    (directory / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return {"topics": len(pydoc_data.topics.topics), "chat_documents": len(chats)}


def main(cli=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--vocab", type=int, default=4096, help="BPE base vocabulary (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = p.parse_args(cli)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from kimi_lm.checkpoint import load
    from kimi_lm.save import save
    from kimi_lm.train import train as trainer
    from kimi_lm.train.bpe import train_bpe, write_tokenizer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kimi-default-") as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus", args.seed)
        texts = [f.read_text(encoding="utf-8") for f in sorted((tmp / "corpus" / "topics").glob("*.txt"))]
        ranks = train_bpe(texts, args.vocab)
        write_tokenizer(tmp / "tokenizer", ranks, TEMPLATE.read_text(encoding="utf-8"))
        (tmp / "config.json").write_text(json.dumps(CONFIG))
        argv = ["--config", str(tmp / "config.json"), "--data", str(tmp / "corpus"), "--tokenizer",
                str(tmp / "tokenizer"), "--out", str(tmp / "run"), "--steps", str(args.steps), "--batch-size",
                str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--warmup", "15",
                "--decay-ratio", "0.3", "--eval-every", "25", "--save-every", "0", "--seed", str(args.seed),
                "--bias-update-rate", "1e-2"]  # few steps: a faster bias step than DeepSeek-V3's 1e-3 per 1k+ steps
        code = trainer.main(argv)
        if code:
            return code
        metrics = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        final = trainer.checkpoints(tmp / "run")[-1]
        model = load(final, dtype=torch.float32)
        seconds = time.perf_counter() - t0
        train_losses = [m["loss"] for m in metrics if "loss" in m]
        build = {
            "command": "python scripts/build_default_model.py " + " ".join(sys.argv[1:] if cli is None else cli),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "corpus": corpus, "parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens": args.steps * args.batch_size * args.seq_len,
            "final_train_loss_mean_last_20": sum(train_losses[-20:]) / len(train_losses[-20:]),
            "final_eval_loss": [m["eval_loss"] for m in metrics if "eval_loss" in m][-1],
            "build_seconds": round(seconds, 1), "torch": torch.__version__,
            "note": "the held-out documents are not independent of training: chat answers repeat topic text "
                    "(4 phrasings per section, plus the topic document), so eval loss measures recall",
        }
        save(model, args.out, dtype=torch.bfloat16, tokenizer_dir=tmp / "tokenizer",
             files={"build.json": json.dumps(build, indent=2) + "\n", "loss.png": tmp / "run" / "loss.png"},
             overwrite=True)
    print(json.dumps(build))
    return 0


if __name__ == "__main__":
    sys.exit(main())
