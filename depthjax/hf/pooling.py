"""Sentence embeddings for sentence-transformers directories (modules.json + 1_Pooling/).

`dj.hf.load` reads the Transformer module's weights; `sentence_pooling` says how its
last hidden states become one vector, and `mean_pool` is the common (mean-tokens) case.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from .config import HFError

_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def sentence_pooling(path: str) -> dict | None:
    """{"mode": "mean"|"cls"|"max", "normalize": bool} of a sentence-transformers
    directory, or None for a plain Hugging Face directory."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.exists(modules_file):
        return None
    with open(modules_file) as f:
        modules = json.load(f)
    pooling, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            with open(os.path.join(path, module["path"], "config.json")) as f:
                options = json.load(f)
            modes = [mode for key, mode in _MODES.items() if options.get(key)]
            others = [
                k
                for k, v in options.items()
                if k.startswith("pooling_mode") and v and k not in _MODES
            ]
            if others or len(modes) != 1:
                raise HFError(
                    f"unsupported sentence-transformers pooling {options}: exactly "
                    "one of mean, cls or max tokens is implemented"
                )
            pooling = modes[0]
        elif kind.endswith("Normalize"):
            normalize = True
        elif not kind.endswith("Transformer"):
            raise HFError(f"unsupported sentence-transformers module {kind!r} in {modules_file}")
    if pooling is None:
        raise HFError(f"{modules_file} has no Pooling module")
    return {"mode": pooling, "normalize": normalize}


def mean_pool(hidden_BTD, mask_BT):
    """Mean of the hidden states of real tokens (mask 1) per sequence: [B, D]."""
    mask = jnp.asarray(mask_BT, hidden_BTD.dtype)[..., None]
    return (hidden_BTD * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)


def pool(hidden_BTD, mask_BT, *, mode: str = "mean", normalize: bool = False):
    """Sentence embeddings [B, D] as sentence-transformers computes them."""
    if mode == "mean":
        out = mean_pool(hidden_BTD, mask_BT)
    elif mode == "cls":
        out = hidden_BTD[:, 0]
    elif mode == "max":
        masked = jnp.where(jnp.asarray(mask_BT, bool)[..., None], hidden_BTD, -jnp.inf)
        out = masked.max(1)
    else:
        raise HFError(f"pooling mode {mode!r} is not one of mean, cls, max")
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
