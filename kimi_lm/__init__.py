"""kimi-lm: run, convert, serve and train Kimi Linear (KDA + MLA hybrid, MoE) and Kimi K2 models in PyTorch.

Public API (everything else is internal and may change):

    model = kimi_lm.load("path/to/Kimi-Linear-48B-A3B-Instruct")   # nn.Module, eval mode
    logits = model(input_ids)                                       # [B, T] -> [B, T, V]
    cache = model.make_cache(batch_size=B); model(ids, cache=cache)  # incremental decoding
    kimi_lm.estimate(config, quant="bf16", context=[4096], batch=1)  # memory needed, from the config alone

    tokenizer = kimi_lm.load_tokenizer(path)                        # tiktoken.model + chat template
    text = kimi_lm.generate(model, tokenizer, prompt, max_tokens=64, temperature=0.7)
    for r in kimi_lm.stream_generate(model, tokenizer, prompt): print(r.text, end="")

    kimi_lm.DEFAULT_MODEL                                           # the bundled tiny model's directory
"""

from pathlib import Path

import torch

# Defined before the imports below so that modules they import may read it (kimi-lm generate without --model).
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"

from kimi_lm.errors import CheckpointError, KimiLMError, UsageError
from kimi_lm.estimate import estimate
from kimi_lm.generate import generate, stream_generate  # the functions: they shadow the module names on purpose
from kimi_lm.tokenizer import load_tokenizer

__all__ = ["CheckpointError", "KimiLMError", "UsageError", "DEFAULT_MODEL", "estimate", "generate", "load", "load_tokenizer", "stream_generate", "__version__"]
__version__ = "0.1.0"


def load(path, dtype=torch.bfloat16, device="cpu", backend: str | None = "auto", pack_weights: bool | None = None):
    """Load a checkpoint directory (config.json + safetensors; see :func:`kimi_lm.checkpoint.load`) for inference,
    or a Hugging Face Hub id ``"ORG/NAME[@REVISION]"`` that is no local path (fetched into the Hub cache once;
    :mod:`kimi_lm.hub`).

    ``backend``: "auto" applies the fast path of ``device`` (on CPU ``kimi_lm.cpu.prepare``: packed products, C
    kernels; the model is then for inference at this dtype and device only); None returns the plain PyTorch model
    (to fine-tune, modify or convert it). ``pack_weights=False`` is the earlier spelling of ``backend=None``.
    """
    from kimi_lm.checkpoint import load as _load
    from kimi_lm.errors import UsageError
    from kimi_lm.hub import resolve

    if pack_weights is False:
        backend = None
    if backend not in ("auto", "cpu", None):
        raise UsageError(f"backend must be 'auto', 'cpu' or None; got {backend!r}")
    path = resolve(path)  # "ORG/NAME[@REVISION]" that is no local path: from the Hugging Face Hub (kimi_lm.hub)
    model = _load(path, dtype=dtype, device=device)
    if backend is not None and torch.device(device).type == "cpu":
        from kimi_lm import cpu

        cpu.prepare(model)
    if torch.device(device).type == "cpu":  # larger than RAM: experts read exactly and ahead (kimi_lm.mapped)
        from kimi_lm.mapped import page_experts

        page_experts(model, sum(f.stat().st_size for f in Path(path).glob("*.safetensors")))
    return model
