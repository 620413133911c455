"""Multiple-choice log-likelihood tasks: examples {"context", "choices", "label"} from a
JSONL file or a list, scored for any batch of programs in one compiled call.

Accuracy as lm-eval defines it: a choice is predicted by its summed log-likelihood
("acc"), by that divided by the choice's length in characters ("acc_norm") or in UTF-8
bytes ("acc_bytes"). Ties go to the first choice (numpy's argmax), as in lm-eval.

A task is a *measure* for depthjax.metrics (ablation, shapley, removal curves, prune):
`task.measure(model, programs)` is [K] values, lower is better (1 - accuracy, or the
mean cross-entropy of the gold choice for metric="nll").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..core.model import DepthModel
from .scoring import EvalError, encode_pair, loglikelihoods, resolve_tokenizer, stack_programs

METRICS = ("acc", "acc_norm", "acc_bytes", "nll")


class TaskError(EvalError):
    """A task file or example list that is malformed (the message names the line)."""


def read_jsonl(path) -> list[tuple[str, dict]]:
    """[(where, record)] of every non-blank line of a JSONL file; where = 'path:line'."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{i + 1}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i + 1}: invalid JSON ({e})") from None
    if not out:
        raise TaskError(f"task file {path} has no examples")
    return out


def check_choice_example(where: str, ex) -> dict:
    """The example if it is {"context": str, "choices": [str, ...], "label": int in range}."""
    if not isinstance(ex, dict):
        raise TaskError(f"{where}: an example is an object, got {type(ex).__name__}")
    missing = [k for k in ("context", "choices", "label") if k not in ex]
    if missing:
        raise TaskError(f"{where}: missing field{'s' * (len(missing) > 1)} {', '.join(missing)}")
    if not isinstance(ex["context"], str) or not ex["context"]:
        raise TaskError(f"{where}: context must be a non-empty string")
    choices = ex["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise TaskError(f"{where}: choices must be a list of at least two non-empty strings")
    label = ex["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise TaskError(
            f"{where}: label {label!r} is not an index into its "
            f"{len(choices)} choices (0..{len(choices) - 1})"
        )
    return ex


def _examples(examples, check) -> list[dict]:
    if isinstance(examples, (str, Path)):
        return [check(where, ex) for where, ex in read_jsonl(examples)]
    examples = list(examples)
    if not examples:
        raise TaskError("no examples")
    return [check(f"example {i}", ex) for i, ex in enumerate(examples)]


@dataclasses.dataclass(eq=False)
class MultipleChoice:
    """A multiple-choice task. `examples`: a JSONL path or a list of dicts."""

    examples: list
    tokenizer: object = None
    name: str = "multiple_choice"
    metric: str = "acc"  # what `measure` reports (lower is better: 1 - metric)
    batch_size: int = 32
    max_len: int | None = None

    def __post_init__(self):
        if isinstance(self.examples, (str, Path)) and self.name == "multiple_choice":
            self.name = Path(self.examples).stem
        self.examples = _examples(self.examples, check_choice_example)
        if self.metric not in METRICS:
            raise TaskError(f"metric must be one of {METRICS}, got {self.metric!r}")
        self._requests = {}

    def requests(self, model: DepthModel):
        """Token requests, every choice of every example in order (cached per tokenizer)."""
        tok = resolve_tokenizer(model, self.tokenizer)
        key = id(tok) if self.tokenizer is not None else "byte"
        if key not in self._requests:
            self._requests[key] = [
                encode_pair(tok, ex["context"], c) for ex in self.examples for c in ex["choices"]
            ]
        return self._requests[key]

    def scores(self, model: DepthModel, programs=None, *, strategy: str = "auto") -> dict:
        """Per-program arrays: acc, acc_norm, acc_bytes, nll [K] and the log-likelihoods
        [K, n_choices] of each example (a list)."""
        ll, greedy = loglikelihoods(
            model,
            self.requests(model),
            programs=programs,
            batch_size=self.batch_size,
            max_len=self.max_len,
            description=f"{self.name}",
            strategy=strategy,
        )
        out = {m: [] for m in ("acc", "acc_norm", "acc_bytes", "nll")}
        lls, greedies, start = [], [], 0
        for ex in self.examples:
            n = len(ex["choices"])
            x = ll[:, start : start + n]  # [K, n]
            lls.append(x)
            greedies.append(greedy[:, start : start + n])
            start += n
            chars = np.array([len(c) for c in ex["choices"]], float)
            nbytes = np.array([len(c.encode("utf-8")) for c in ex["choices"]], float)
            gold = ex["label"]
            out["acc"].append(np.argmax(x, 1) == gold)
            out["acc_norm"].append(np.argmax(x / chars, 1) == gold)
            out["acc_bytes"].append(np.argmax(x / nbytes, 1) == gold)
            m = x.max(1, keepdims=True)
            log_z = m[:, 0] + np.log(np.exp(x - m).sum(1))
            out["nll"].append(log_z - x[:, gold])
        res = {k: np.mean(np.stack(v, 1), axis=1) for k, v in out.items()}
        return {**res, "loglikelihoods": lls, "is_greedy": greedies}

    def evaluate(self, model: DepthModel, programs=None) -> dict:
        """{"acc", "acc_norm", "acc_bytes", "nll", "loglikelihoods", "is_greedy", "n"}; scalars
        (and [n_choices] arrays) for one program, a leading [K] axis for a batch."""
        _, batched = stack_programs(model, programs)
        res = self.scores(model, programs)
        pick = (lambda a: a) if batched else (lambda a: a[0])
        out = {
            k: pick(res[k]) if batched else float(res[k][0])
            for k in ("acc", "acc_norm", "acc_bytes", "nll")
        }
        out["loglikelihoods"] = [pick(x) for x in res["loglikelihoods"]]
        out["is_greedy"] = [pick(x) for x in res["is_greedy"]]
        out["n"] = len(self.examples)
        return out

    def measure(self, model: DepthModel, programs, *, strategy: str = "auto") -> np.ndarray:
        """[K] lower-is-better values: 1 - acc (acc_norm, acc_bytes), or the gold choice's
        mean cross-entropy over the choices (metric="nll")."""
        res = self.scores(model, programs, strategy=strategy)
        return res["nll"] if self.metric == "nll" else 1.0 - res[self.metric]


def multiple_choice(
    model: DepthModel,
    examples,
    *,
    tokenizer=None,
    programs=None,
    batch_size: int = 32,
    max_len: int | None = None,
) -> dict:
    """Accuracy of a multiple-choice task: examples [{"context", "choices", "label"}] or a
    JSONL path -> {"acc", "acc_norm", "acc_bytes", "nll", "loglikelihoods", ...}."""
    task = (
        examples
        if isinstance(examples, MultipleChoice)
        else MultipleChoice(examples, tokenizer, batch_size=batch_size, max_len=max_len)
    )
    return task.evaluate(model, programs)
