"""How a config.json is read and checked: shared by the config classes of ``kimi_lm.config``.

Reading (``read_config_json``: a JSON object or a ``CheckpointError`` naming the file), key normalisation (alias
spellings copied to the official key; a key whose value changes the math in an unimplemented way is refused), field
type checks against the dataclass annotations, and the two nested blocks K2 configs carry: YaRN ``rope_scaling``
(filled in as transformers does) and the FP8 ``quantization_config``.

References: ``shared/specs/kimi_linear.md`` §1; ``shared/specs/kimi_k2_and_quantization.md`` §1, §2.4 (YaRN keys),
§4 (``quantization_config``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kimi_lm.errors import CheckpointError

K2_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_MODEL_TYPES = ("kimi_linear", *K2_MODEL_TYPES, "kimi_k3", "kimi_k25")


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


# sizes that must be ≥ 1 (counts such as num_nextn_predict_layers or first_k_dense_replace may be 0)
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "kv_lora_rank", "v_head_dim", "moe_intermediate_size", "num_experts", "n_routed_experts",
             "num_experts_per_token", "num_experts_per_tok", "moe_layer_freq")
# annotation text of a config field -> the JSON value types it accepts (bool is not an int here)
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


def check_field_types(cfg, source: str) -> None:
    """Every scalar field holds a value of its annotated type (``| None`` allows null); positive sizes."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        accepted = tuple(t for k in kinds for t in _FIELD_TYPES.get(k, (object,)))
        wrong_bool = isinstance(value, bool) and bool not in accepted
        if not isinstance(value, accepted) or wrong_bool:
            raise CheckpointError(f"{source}: config key {f.name!r} = {value!r}, expected {str(f.type)!r}")
        if f.name in _POSITIVE and value <= 0:
            raise CheckpointError(f"{source}: config key {f.name!r} = {value!r}, expected a positive integer")


def build(cls, d: dict, source: str):
    """The config from normalised official keys (others ignored), validated."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in d.items() if k in names})
    cfg.validate(source)
    return cfg


def normalise_keys(cls, d: dict, aliases: dict, implemented: dict, source: str) -> None:
    """In place: check model_type, copy alias spellings to the official key, and refuse any key whose value
    changes the math in a way this class does not implement (``implemented``: key -> accepted values)."""
    check_model_type(cls, d.get("model_type"), source)
    for alias, key in aliases.items():
        if alias in d and key not in d:
            d[key] = d[alias]
    for key, ok in implemented.items():
        if key in d and d[key] not in ok:
            raise CheckpointError(
                f"{source}: config key {key!r} = {d[key]!r} changes the model's math and is not implemented "
                f"(supported: {' or '.join(repr(v) for v in ok if v is not None)})"
            )


def unwrap_text_config(raw: dict, text_model_types: tuple[str, ...], source: str) -> dict:
    """A multimodal wrapper's config.json (Kimi K3 ``kimi_k3``: ``text_config`` + ``vision_config``) -> the dict its
    text config class reads: ``text_config``'s keys, the wrapper's ``model_type``, ``quantization_config`` from
    ``text_config`` or else the top level (K3 has it nested; transformers dumps also copy it up), token ids and
    ``tie_word_embeddings`` from the top level where the text part lacks them, and every top-level key but
    ``text_config`` under ``"wrapper"`` (``wrap_text_config`` writes them back). Tensors sit under
    ``names.WRAPPER_PREFIX``; the vision model is not loaded."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is a multimodal wrapper; it needs a "
                              f"'text_config' object, found {text!r}")
    if text.get("model_type") not in (None, *text_model_types):
        raise CheckpointError(f"{source}: text_config.model_type {text.get('model_type')!r} is not supported inside "
                              f"{raw.get('model_type')!r} (expected {' or '.join(map(repr, text_model_types))})")
    d = dict(text)
    for key in ("quantization_config", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if d.get(key) is None and raw.get(key) is not None:
            d[key] = raw[key]
    d["model_type"] = raw.get("model_type")
    d["wrapper"] = {k: v for k, v in raw.items() if k != "text_config"}
    return d


def wrap_text_config(text: dict, wrapper: dict | None, model_type: str, text_model_type: str) -> dict:
    """The inverse of ``unwrap_text_config``: the wrapper's keys with ``text`` as its ``text_config``."""
    out = {k: v for k, v in (wrapper or {}).items() if k != "text_config"}
    out["model_type"] = model_type
    out["text_config"] = {**{k: v for k, v in text.items() if k != "wrapper"}, "model_type": text_model_type}
    return out


def check_model_type(cls, model_type, source: str) -> None:
    if model_type in cls.MODEL_TYPES:
        return
    if model_type in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a {cls.__name__}; read it with load_config()")
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}"
    )


def normalise_rope_scaling(rs: dict | None, max_positions: int, source: str) -> dict | None:
    """None for plain RoPE, else a YaRN dict with every key transformers would fill in (spec §2.4)."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise CheckpointError(f"{source}: rope_scaling must be an object or null; found {rs!r}")
    kind = rs.get("type", rs.get("rope_type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope_scaling.type {kind!r} is not supported (supported: 'yarn', 'default')")
    out = {k: v for k, v in rs.items() if k not in ("type", "rope_type", "rope_theta")}
    out["type"] = "yarn"
    out.setdefault("original_max_position_embeddings", max_positions)
    if out.get("factor") is None:  # transformers: the context extension itself
        out["factor"] = max_positions / out["original_max_position_embeddings"]
    # transformers treats missing *and* falsy betas as the YaRN paper's 32 / 1
    out["beta_fast"] = out.get("beta_fast") or 32
    out["beta_slow"] = out.get("beta_slow") or 1
    return out


def check_fp8_config(q: dict, source: str) -> None:
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method != "fp8":
        raise CheckpointError(f"{source}: quantization_config.quant_method {method!r} is not supported (supported: 'fp8')")
    checks = {"fmt": ("e4m3",), "weight_block_size": ([128, 128],), "activation_scheme": ("dynamic",)}
    for key, ok in checks.items():
        value = q.get(key, ok[0])
        if (list(value) if isinstance(value, (list, tuple)) else value) not in ok:
            raise CheckpointError(
                f"{source}: quantization_config.{key} {value!r} is not supported (supported: {ok[0]!r}, the "
                f"DeepSeek-V3 / Kimi K2 FP8 format)"
            )
