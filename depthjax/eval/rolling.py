"""Rolling perplexity of documents: nats per token and bits per byte, every token scored
once through disjoint windows (lm-eval's loglikelihood_rolling), batched on device.

Documents come from a list of strings, text/JSONL files (paths, globs or directories),
`tfds:NAME[:SPLIT]` (an installed TFDS dataset, read with `tfds.data_source`), or any
sequence of documents (e.g. `depthjax.train.data.documents(...)`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from ..core.model import DepthModel
from ..files.textfiles import DataError, expand_files, read_documents
from .scoring import loglikelihoods, resolve_tokenizer, rolling_requests, stack_programs


def documents(data, *, text_key: str = "text", data_dir=None) -> list[str]:
    """The documents of `data` as strings (see the module docstring)."""
    if isinstance(data, (str, Path)) and str(data).startswith("tfds:"):
        from ..train.data import documents as data_documents

        name, _, split = str(data)[5:].partition(":")
        docs = data_documents(
            "tfds",
            "valid",
            tfds_name=name,
            data_dir=data_dir,
            text_key=text_key,
            valid_split=split or "validation",
        )
    elif isinstance(data, (str, Path)):
        docs = [text for f in expand_files([str(data)]) for _, text in read_documents(f, text_key)]
    elif isinstance(data, (list, tuple)) or hasattr(data, "__getitem__"):
        docs = data
    else:
        raise DataError(
            f"perplexity data must be documents, a file or a 'tfds:NAME' spec, "
            f"got {type(data).__name__}"
        )
    out = [
        d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d
        for d in (docs[i] for i in range(len(docs)))
    ]
    bad = [i for i, d in enumerate(out) if not isinstance(d, str)]
    if bad:
        raise DataError(f"documents {bad[:5]} are not text")
    out = [d for d in out if d]
    if not out:
        where = data if isinstance(data, (str, os.PathLike)) else "the data"
        raise DataError(f"no non-empty documents in {where}")
    return out


@dataclasses.dataclass(eq=False)
class Perplexity:
    """Rolling perplexity of documents (see `documents` for what `data` may be).

    max_len: window length (default the config's max_seq_len); context_len: tokens of
    overlap each later window reads before its predictions start (lm-eval's, default 1:
    disjoint windows); prefix_token: scored as the context of the first token (lm-eval
    uses end-of-text), or None to leave each document's first token unscored, as training
    and `metrics.loss` do. `measure` is nats per token.
    """

    data: object
    tokenizer: object = None
    name: str = "perplexity"
    max_len: int | None = None
    context_len: int = 1
    prefix_token: int | None = None
    batch_size: int = 16
    text_key: str = "text"

    def __post_init__(self):
        self.docs = documents(self.data, text_key=self.text_key)
        self._cache = {}

    def requests(self, model: DepthModel):
        """(requests, predicted tokens, predicted bytes), cached per tokenizer and length."""
        tok = resolve_tokenizer(model, self.tokenizer)
        max_len = self.max_len or model.config.max_seq_len
        key = (id(tok) if self.tokenizer is not None else "byte", max_len)
        if key not in self._cache:
            reqs, n_tokens, n_bytes = [], 0, 0
            for doc in self.docs:
                ids = np.asarray(tok.encode(doc), np.int32)
                doc_reqs = rolling_requests(
                    ids, max_len, context_len=self.context_len, prefix_token=self.prefix_token
                )
                reqs += doc_reqs
                n_tokens += sum(len(r.continuation) for r in doc_reqs)
                unscored = "" if self.prefix_token is not None else tok.decode(ids[:1])
                n_bytes += len(doc.encode("utf-8")) - len(unscored.encode("utf-8"))
            self._cache[key] = (reqs, n_tokens, n_bytes)
        return self._cache[key]

    def scores(self, model: DepthModel, programs=None, *, strategy: str = "auto") -> dict:
        reqs, n_tokens, n_bytes = self.requests(model)
        if not n_tokens:
            raise DataError(
                "the documents have no token to predict (each is one token long "
                "and prefix_token is None)"
            )
        ll, _ = loglikelihoods(
            model,
            reqs,
            programs=programs,
            batch_size=self.batch_size,
            max_len=self.max_len,
            description=self.name,
            strategy=strategy,
        )
        nll = -ll.sum(1)  # [K]
        return {
            "nats_per_token": nll / n_tokens,
            "bits_per_byte": nll / n_bytes / math.log(2),
            "perplexity": np.exp(nll / n_tokens),
            "nll": nll,
            "tokens": n_tokens,
            "bytes": n_bytes,
            "documents": len(self.docs),
        }

    def evaluate(self, model: DepthModel, programs=None) -> dict:
        _, batched = stack_programs(model, programs)
        res = self.scores(model, programs)
        if not batched:
            res = {k: float(v[0]) if isinstance(v, np.ndarray) else v for k, v in res.items()}
        return res

    def measure(self, model: DepthModel, programs, *, strategy: str = "auto") -> np.ndarray:
        """[K] nats per predicted token (lower is better)."""
        return self.scores(model, programs, strategy=strategy)["nats_per_token"]


def perplexity(
    model: DepthModel,
    data,
    *,
    tokenizer=None,
    programs=None,
    max_len: int | None = None,
    context_len: int = 1,
    prefix_token: int | None = None,
    batch_size: int = 16,
    text_key: str = "text",
) -> dict:
    """Rolling perplexity: {"nats_per_token", "bits_per_byte", "perplexity", "nll",
    "tokens", "bytes", "documents"} (a [K] axis for a batch of programs)."""
    return Perplexity(
        data,
        tokenizer,
        max_len=max_len,
        context_len=context_len,
        prefix_token=prefix_token,
        batch_size=batch_size,
        text_key=text_key,
    ).evaluate(model, programs)
