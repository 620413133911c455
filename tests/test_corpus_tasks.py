"""The embedded-corpus tasks: real text of held-out files, valid labels, determinism."""

import re

from depthjax.eval import corpus_tasks
from depthjax.files import corpus


def _held_out_sources():
    valid, train = corpus.stdlib_files("valid"), corpus.stdlib_files("train")
    assert not set(valid) & set(train)
    return [p.read_text(encoding="utf-8", errors="replace") for p in valid]


def test_next_line_examples_are_real_continuations_of_held_out_files():
    task = corpus_tasks.next_line(40, seed=1)
    sources = _held_out_sources()
    assert task.name == "next_line" and len(task.examples) == 40
    for ex in task.examples:
        assert len(ex["choices"]) == 4 and len({c.strip() for c in ex["choices"]}) == 4
        real = ex["context"] + ex["choices"][ex["label"]]
        assert any(real in s for s in sources)
    assert corpus_tasks.next_line(40, seed=1).examples == task.examples
    assert corpus_tasks.next_line(40, seed=2).examples != task.examples


def test_identifier_recall_asks_for_a_name_defined_far_back():
    task = corpus_tasks.identifier_recall(30, seed=0)
    sources = _held_out_sources()
    for ex in task.examples:
        name = ex["choices"][ex["label"]]
        assert len(set(ex["choices"])) == 4
        assert re.match(rf"[ \t]*def {re.escape(name)}\(", ex["context"])
        assert 200 <= len(ex["context"]) <= 1000
        assert any(ex["context"] + name + "(" in s for s in sources)
        for other in ex["choices"]:  # every candidate is a function of that file
            assert any(f"def {other}(" in s and ex["context"] in s for s in sources)
