"""Two multiple-choice tasks built from the embedded corpus (Python standard library
sources), so the demo and experiments can show task-level trade-offs without downloads.

* `next_line`: the `context_lines` lines of a source file before a line, and four
  candidates for that line: the real one and three lines drawn from other files (local,
  short-range: syntax and style of the next line).
* `identifier_recall`: a function defined in a file is called again at least `min_gap`
  characters later; the context runs from the definition to just before the call, and the
  candidates are the function's name and three other functions defined in the same file
  (long-range: recall which name was defined earlier, not which looks plausible here;
  method calls `self.name(` count).

Both draw only from the corpus's validation split (`corpus.stdlib_files("valid")`), which
training never reads (`depthjax train` and the demo train on the train split), so the
examples are held out. Every example is deterministic in `seed`.
"""

from __future__ import annotations

import re

import numpy as np

from ..files import corpus
from .tasks import MultipleChoice

_DEF = re.compile(r"^[ \t]*def ([A-Za-z_][A-Za-z0-9_]{2,})\(", re.M)


def _sources(split: str) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in corpus.stdlib_files(split)]


def _candidate_line(line: str) -> bool:
    s = line.strip()
    return len(s) >= 12 and not s.startswith("#")


def next_line(
    n: int = 200, *, context_lines: int = 8, seed: int = 0, split: str = "valid", tokenizer=None
) -> MultipleChoice:
    """`n` examples: which of four lines comes next after `context_lines` lines of source."""
    rng = np.random.default_rng(seed)
    files = [t.splitlines() for t in _sources(split)]
    pool = [line for lines in files for line in lines if _candidate_line(line)]
    examples = []
    for _ in range(100 * n):
        if len(examples) == n:
            break
        lines = files[rng.integers(len(files))]
        if len(lines) <= context_lines + 1:
            continue
        i = int(rng.integers(context_lines, len(lines)))
        target = lines[i]
        if not _candidate_line(target):
            continue
        distractors = []
        while len(distractors) < 3:
            d = pool[rng.integers(len(pool))]
            if d.strip() != target.strip() and d not in distractors:
                distractors.append(d)
        choices = [target] + distractors
        order = rng.permutation(4)
        examples.append(
            {
                "context": "\n".join(lines[i - context_lines : i]) + "\n",
                "choices": [choices[j] for j in order],
                "label": int(np.flatnonzero(order == 0)[0]),
            }
        )
    if len(examples) < n:
        raise RuntimeError(f"the corpus gave only {len(examples)} next-line examples of {n}")
    return MultipleChoice(examples, tokenizer, name="next_line")


def identifier_recall(
    n: int = 100,
    *,
    min_gap: int = 200,
    max_context: int = 1000,
    seed: int = 0,
    split: str = "valid",
    tokenizer=None,
) -> MultipleChoice:
    """`n` examples: which of four functions defined in the file is called here, with its
    definition at least `min_gap` characters back (the context keeps at most
    `max_context` characters and always the definition)."""
    rng = np.random.default_rng(seed)
    sites = []  # (text, def start, call start, name, other names)
    for text in _sources(split):
        defs = {}
        for m in _DEF.finditer(text):
            defs.setdefault(m.group(1), m.start())
        if len(defs) < 4:
            continue
        for name, start in defs.items():
            for call in re.finditer(rf"(?<!\w){re.escape(name)}\(", text[start + 1 :]):
                at = start + 1 + call.start()
                if at - start > max_context:
                    break
                if at - start >= min_gap:  # every call far enough from the definition
                    sites.append((text, start, at, name, [d for d in defs if d != name]))
    if len(sites) < n:
        raise RuntimeError(
            f"the corpus has only {len(sites)} identifier-recall sites, fewer than {n}"
        )
    examples = []
    for k in rng.choice(len(sites), n, replace=False):
        text, start, at, name, others = sites[k]
        choices = [name] + [others[j] for j in rng.choice(len(others), 3, replace=False)]
        order = rng.permutation(4)
        examples.append(
            {
                "context": text[start:at],
                "choices": [choices[j] for j in order],
                "label": int(np.flatnonzero(order == 0)[0]),
            }
        )
    return MultipleChoice(examples, tokenizer, name="identifier_recall")
