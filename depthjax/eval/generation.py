"""Greedy generation until stop strings, and exact match against targets.

Prompts are left-padded to a power-of-two length (at least 8) in batches of `batch_size` rows and
decoded by `dj.generate` (KV cache, one compiled loop per length bucket). The text is cut
at the earliest stop string on the host; a stop string that is one token also stops the
device loop early (it becomes the eos id).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..core.model import DepthModel
from ..inference.driver import generate
from ..progress import track
from .scoring import EvalError, require_causal, resolve_tokenizer, stack_programs
from .tasks import TaskError, _examples


def _cut(text: str, stop) -> str:
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def generate_until(
    model: DepthModel,
    contexts,
    *,
    stop=("\n",),
    max_new_tokens: int = 32,
    tokenizer=None,
    programs=None,
    batch_size: int = 16,
    eos_id: int | None = None,
) -> list:
    """Greedy continuations of each context, cut before the first stop string: a list of
    strings, or (for a batch of programs) one list per program."""
    require_causal(model, "generation")
    if max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise EvalError(f"stop strings must be non-empty strings, got {stop!r}")
    tok = resolve_tokenizer(model, tokenizer)
    stacked, batched = stack_programs(model, programs)
    if eos_id is None:  # a one-token stop string can end the device loop early
        eos_id = next(
            (int(ids[0]) for ids in (np.asarray(tok.encode(s)) for s in stop) if ids.size == 1),
            None,
        )
    room = model.config.max_seq_len - max_new_tokens
    if room < 1:
        raise EvalError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"max_seq_len={model.config.max_seq_len}"
        )
    prompts = []
    for i, c in enumerate(contexts):
        ids = np.asarray(tok.encode(c), np.int32)[-room:]  # keep the end of the context
        if not ids.size:
            raise EvalError(f"context {i} encodes to no tokens")
        prompts.append(ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    B = min(batch_size, 1 << max(0, len(prompts) - 1).bit_length())
    groups = [order[s : s + B] for s in range(0, len(order), B)]
    K = 1 if stacked is None else stacked.block.shape[0]  # None: a stitched model
    outs = [[""] * len(prompts) for _ in range(K)]
    for k in range(K):
        m = (
            model
            if stacked is None
            else model.with_program(jax.tree.map(lambda a, k=k: a[k], stacked))
        )
        for group in track(groups, "generate" + (f" (program {k + 1}/{K})" if K > 1 else "")):
            T = min(room, max(8, 1 << (max(len(prompts[i]) for i in group) - 1).bit_length()))
            tokens, mask = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
            mask[:, -1] = True  # filler rows: one real token
            for r, i in enumerate(group):
                tokens[r, T - len(prompts[i]) :], mask[r, T - len(prompts[i]) :] = prompts[i], True
            gen = generate(m, tokens, max_new_tokens, mask=mask, temperature=0.0, eos_id=eos_id)
            new, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
            for r, i in enumerate(group):
                outs[k][i] = _cut(tok.decode(new[r, : lengths[r]]), stop)
    return outs if batched else outs[0]


def check_target_example(where: str, ex) -> dict:
    if not isinstance(ex, dict):
        raise TaskError(f"{where}: an example is an object, got {type(ex).__name__}")
    missing = [k for k in ("context", "target") if k not in ex]
    if missing:
        raise TaskError(f"{where}: missing field{'s' * (len(missing) > 1)} {', '.join(missing)}")
    if not isinstance(ex["context"], str) or not ex["context"]:
        raise TaskError(f"{where}: context must be a non-empty string")
    if not isinstance(ex["target"], str):
        raise TaskError(f"{where}: target must be a string")
    return ex


@dataclasses.dataclass(eq=False)
class ExactMatch:
    """Greedy generation scored by exact match: examples {"context", "target"} (a JSONL
    path or a list). Output and target are compared after stripping surrounding whitespace
    (strip=False compares them as they are). `measure` is 1 - exact match."""

    examples: list
    tokenizer: object = None
    name: str = "exact_match"
    stop: tuple = ("\n",)
    max_new_tokens: int = 32
    strip: bool = True
    batch_size: int = 16

    def __post_init__(self):
        self.examples = _examples(self.examples, check_target_example)

    def scores(self, model: DepthModel, programs=None) -> dict:
        stacked, _ = stack_programs(model, programs)
        outs = generate_until(
            model,
            [ex["context"] for ex in self.examples],
            stop=self.stop,
            max_new_tokens=self.max_new_tokens,
            tokenizer=self.tokenizer,
            programs=stacked,
            batch_size=self.batch_size,
        )
        norm = (lambda s: s.strip()) if self.strip else (lambda s: s)
        hits = np.array(
            [[norm(o) == norm(ex["target"]) for o, ex in zip(row, self.examples)] for row in outs]
        )
        return {"exact_match": hits.mean(1), "outputs": outs, "hits": hits}

    def evaluate(self, model: DepthModel, programs=None) -> dict:
        _, batched = stack_programs(model, programs)
        res = self.scores(model, programs)
        if batched:
            return {**res, "n": len(self.examples)}
        return {
            "exact_match": float(res["exact_match"][0]),
            "outputs": res["outputs"][0],
            "hits": res["hits"][0],
            "n": len(self.examples),
        }

    def measure(self, model: DepthModel, programs) -> np.ndarray:
        return 1.0 - self.scores(model, programs)["exact_match"]


def exact_match(
    model: DepthModel,
    examples,
    *,
    tokenizer=None,
    programs=None,
    stop=("\n",),
    max_new_tokens: int = 32,
    strip: bool = True,
    batch_size: int = 16,
) -> dict:
    """Exact match of greedy continuations: {"exact_match", "outputs", "hits", "n"}."""
    return ExactMatch(
        examples,
        tokenizer,
        stop=tuple([stop] if isinstance(stop, str) else stop),
        max_new_tokens=max_new_tokens,
        strip=strip,
        batch_size=batch_size,
    ).evaluate(model, programs)
