"""Task-level evaluation, batched and jitted on device, for any program or a batch of them.

    dj.eval.multiple_choice(model, "task.jsonl")     # {"context", "choices", "label"} lines
    dj.eval.perplexity(model, "docs/*.txt")          # rolling: nats/token, bits/byte
    dj.eval.exact_match(model, examples, stop=["\\n"])  # greedy generation, {"context", "target"}
    dj.eval.representation(model, batches)           # encoders: cosine to the full model

Every function takes `programs=` (a Program, a [K, depth] batch of them or a list): all
programs of one depth share one compiled call, and results gain a leading [K] axis.

A *task* object (MultipleChoice, Perplexity, ExactMatch, Representation) holds its data
and tokenizer, and has
    task.evaluate(model, programs=None) -> dict of results
    task.measure(model, programs) -> np.ndarray [K], lower is better
so it is a measure for depthjax.metrics (`ablation(model, None, measure=task)`), dj.prune
and program search. MultipleChoice, Perplexity and Representation evaluate their programs
through depthjax.metrics.strategies (`measure(..., strategy="auto"|"batched"|"prefix")`):
ablations start from the model's own residual where they first differ. `load_task(path)`
reads a JSONL file by its fields.

`corpus_tasks.next_line()` and `corpus_tasks.identifier_recall()` are two multiple-choice
tasks built from the embedded corpus's held-out split (short- and long-range).
`depthjax.eval.harness` plugs depthjax models into lm-evaluation-harness (extra [eval]).
"""

from pathlib import Path

from . import corpus_tasks
from .generation import ExactMatch, exact_match, generate_until
from .rolling import Perplexity, documents, perplexity
from .scoring import EvalError, Request, encode_pair, loglikelihoods, rolling_requests
from .similarity import Representation, representation
from .tasks import MultipleChoice, TaskError, multiple_choice, read_jsonl


def load_task(path, **kwargs):
    """A task from a JSONL file, by its first record's fields: {"context", "choices",
    "label"} -> MultipleChoice, {"context", "target"} -> ExactMatch, {"text"} ->
    Perplexity. Keyword arguments go to the task (tokenizer=, metric=, ...)."""
    where, first = read_jsonl(path)[0]
    fields = set(first) if isinstance(first, dict) else set()
    if "choices" in fields or "label" in fields:
        return MultipleChoice(path, **kwargs)
    if "target" in fields:
        return ExactMatch(path, name=kwargs.pop("name", Path(path).stem), **kwargs)
    if "text" in fields:
        return Perplexity(path, name=kwargs.pop("name", Path(path).stem), **kwargs)
    raise TaskError(
        f"{where}: cannot tell the task from the fields {sorted(fields)}: "
        "expected context/choices/label (multiple choice), context/target "
        "(exact match) or text (perplexity)"
    )


__all__ = [
    "corpus_tasks",
    "EvalError",
    "ExactMatch",
    "MultipleChoice",
    "Perplexity",
    "Representation",
    "Request",
    "TaskError",
    "documents",
    "encode_pair",
    "exact_match",
    "generate_until",
    "load_task",
    "loglikelihoods",
    "multiple_choice",
    "perplexity",
    "read_jsonl",
    "representation",
    "rolling_requests",
]
