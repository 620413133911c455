"""The error type of depthjax.hf and the config.json reader every family mapping uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import DepthjaxError


class HFError(DepthjaxError):
    """A Hugging Face checkpoint or config that depthjax cannot read or write exactly."""


# Keys that do not change the inference forward pass: token ids, dropout, init, caching,
# labels, task heads' extras and bookkeeping.
INERT = {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
    "problem_type",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "classifier_dropout",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "pretraining_tp",
    "tokenizer_class",
    "task_specific_params",
    "gradient_checkpointing",
    "cache_implementation",
    # Numerics only: upcasting inside attention changes nothing in float32.
    "reorder_and_upcast_attn",
}


class Reader:
    """Reads a config dict, remembering which keys were consumed; `defaults` are the
    architecture's own defaults for keys a config.json may leave out."""

    def __init__(self, d: Mapping[str, Any], defaults: Mapping[str, Any]):
        self.d, self.used = dict(d), set()
        self.defaults = dict(defaults)

    def get(self, key, default=...):
        self.used.add(key)
        if key in self.d:
            return self.d[key]
        if key in self.defaults:
            return self.defaults[key]
        if default is ...:
            raise HFError(f"config.json is missing the required key {key!r}")
        return default

    def require(self, key, allowed, why: str):
        value = self.get(key, None)
        if value not in allowed:
            raise HFError(f"unsupported config option {key}={value!r}: {why}")
        return value

    def leftover(self) -> list[str]:
        return sorted(k for k in self.d if k not in self.used and k not in INERT)


def expect(cfg, model_type: str, **wanted) -> None:
    """Raise HFError unless every named ModelConfig field has the wanted value."""
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise HFError(
                f"cannot export to {model_type}: it needs {key}={value!r}, the "
                f"model has {key}={getattr(cfg, key)!r}"
            )
