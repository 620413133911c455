"""dj.eval against naive references: per-example unbatched forwards in numpy, direct sums of
token NLLs, hand-computed accuracy definitions, a token-by-token greedy loop."""

import json
import math

import jax
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
import depthjax.metrics as M
from depthjax.eval import scoring
from depthjax.metrics import strategies as S
from tests.conftest import import_lm_eval


@pytest.fixture(scope="module")
def model():
    return dj.init(dj.configs.get("llama-tiny", max_seq_len=64), jax.random.key(3))


forward = jax.jit(lambda m, tokens: dj.apply(m, tokens))  # the reference: one row, no padding


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def naive_loglik(model, ctx: bytes, cont: bytes, max_len=None):
    """One unpadded forward of the (left-truncated) sequence; sum of continuation log-probs."""
    seq = np.frombuffer(ctx + cont, np.uint8).astype(np.int32)
    if max_len is not None:
        seq = seq[-(max_len + 1) :]
    logp = log_softmax(forward(model, seq[None, :-1])[0])
    n = len(cont)
    rows = np.arange(len(seq) - 1 - n, len(seq) - 1)
    return float(logp[rows, seq[rows + 1]].sum()), bool(
        (logp[rows].argmax(-1) == seq[rows + 1]).all()
    )


EXAMPLES = [  # choices of different lengths, non-ASCII (chars != bytes), shared prefixes
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " é"], "label": 0},
    {"context": "import os\nimport ", "choices": ["sys", "résumé", "re"], "label": 2},
    {"context": "for i in range(10):", "choices": ["\n    pass", " print(i)"], "label": 1},
    {"context": "x = [1, 2, 3", "choices": ["]", ")", "}", "] + [4]"], "label": 0},
]


def test_multiple_choice_matches_naive_loop_and_definitions(model):
    res = dj.eval.multiple_choice(model, EXAMPLES, batch_size=4)
    acc = acc_norm = acc_bytes = nll = 0.0
    for ex, lls in zip(EXAMPLES, res["loglikelihoods"]):
        ctx = ex["context"].rstrip().encode()  # lm-eval moves trailing spaces over
        space = ex["context"][len(ex["context"].rstrip()) :].encode()
        want = [naive_loglik(model, ctx, space + c.encode())[0] for c in ex["choices"]]
        np.testing.assert_allclose(lls, want, rtol=1e-5, atol=1e-4)
        want = np.array(want)
        acc += np.argmax(want) == ex["label"]
        acc_norm += np.argmax(want / [len(c) for c in ex["choices"]]) == ex["label"]
        acc_bytes += np.argmax(want / [len(c.encode()) for c in ex["choices"]]) == ex["label"]
        nll += -log_softmax(want)[ex["label"]]
    n = len(EXAMPLES)
    assert res["acc"] == acc / n and res["acc_norm"] == acc_norm / n
    assert res["acc_bytes"] == acc_bytes / n and res["n"] == n
    assert res["nll"] == pytest.approx(nll / n, rel=1e-5)


def test_accuracy_definitions_on_constructed_loglikelihoods(monkeypatch, model):
    """acc, acc_norm (characters) and acc_bytes (UTF-8 bytes) pick different choices."""
    examples = [{"context": "q", "choices": ["aaaa", "é", "bb"], "label": 1}]
    # log-likelihoods: -4 (4 chars, 4 bytes), -1.5 (1 char, 2 bytes), -1.2 (2 chars, 2 bytes)
    fake = lambda *a, **k: (np.array([[-4.0, -1.5, -1.2]]), np.zeros((1, 3), bool))
    monkeypatch.setattr(dj.eval.tasks, "loglikelihoods", fake)
    res = dj.eval.multiple_choice(model, examples)
    # acc: argmax(-4, -1.5, -1.2) = 2; acc_norm: (-1, -1.5, -0.6) -> 2;
    # acc_bytes: (-1, -0.75, -0.6) -> 2; make the byte one differ:
    assert (res["acc"], res["acc_norm"], res["acc_bytes"]) == (0.0, 0.0, 0.0)
    fake2 = lambda *a, **k: (np.array([[-4.0, -1.3, -1.2]]), np.zeros((1, 3), bool))
    monkeypatch.setattr(dj.eval.tasks, "loglikelihoods", fake2)
    res = dj.eval.multiple_choice(model, examples)
    # acc -> 2 (-1.2); acc_norm -> 2 (-0.6 vs -1.3); acc_bytes -> 2 (-0.6 vs -0.65)
    assert (res["acc"], res["acc_norm"], res["acc_bytes"]) == (0.0, 0.0, 0.0)
    fake3 = lambda *a, **k: (np.array([[-4.0, -1.1, -1.2]]), np.zeros((1, 3), bool))
    monkeypatch.setattr(dj.eval.tasks, "loglikelihoods", fake3)
    res = dj.eval.multiple_choice(model, examples)
    # acc -> 1 (-1.1); acc_norm -> 2 (-0.6 vs -1.1); acc_bytes -> 1 (-0.55 vs -0.6)
    assert (res["acc"], res["acc_norm"], res["acc_bytes"]) == (1.0, 0.0, 1.0)


def test_batch_of_programs_is_one_compile_and_matches_each(model):
    programs = [
        model.program,
        D.drop_sublayers(model, attn=[1]).program,
        D.drop_sublayers(model, mlp=[0, 3]).program,
    ]
    task = dj.eval.MultipleChoice(EXAMPLES, batch_size=16)
    task.evaluate(model)  # warm: K=1 compiled
    compiles = lambda: sum(f._cache_size() for f in (S.batched_reduce, S.prefix_reduce))
    before = compiles()
    task.evaluate(model.with_program(programs[1]))  # another program: no new compile
    assert compiles() == before
    res = task.evaluate(model, programs=programs)
    assert res["acc"].shape == (3,)
    for k, p in enumerate(programs):
        one = task.evaluate(model.with_program(p))
        np.testing.assert_allclose(res["loglikelihoods"][2][k], one["loglikelihoods"][2], atol=1e-5)
        assert res["acc"][k] == one["acc"]


def test_loglikelihoods_truncate_context_from_the_left(model):
    ctx, cont = b"x" * 50 + b"abcdefghijklmnop" * 4, b"tail"
    req = scoring.Request(
        np.frombuffer(ctx, np.uint8).astype(np.int32),
        np.frombuffer(cont, np.uint8).astype(np.int32),
    )
    ll, greedy = dj.eval.loglikelihoods(model, [req], max_len=32)
    want, want_greedy = naive_loglik(model, ctx, cont, max_len=32)
    assert ll[0, 0] == pytest.approx(want, abs=1e-4) and greedy[0, 0] == want_greedy


def test_perplexity_equals_metrics_loss_and_direct_sum(model, tmp_path):
    rng = np.random.default_rng(0)
    docs = ["".join(chr(c) for c in rng.integers(32, 127, 40)) for _ in range(3)]
    res = dj.eval.perplexity(model, docs)
    tokens = np.stack([np.frombuffer(d.encode(), np.uint8).astype(np.int32) for d in docs])
    assert res["nats_per_token"] == pytest.approx(M.loss(model, tokens), rel=1e-5)
    assert res["tokens"] == 3 * 39 and res["bytes"] == 3 * 39
    assert res["bits_per_byte"] == pytest.approx(res["nats_per_token"] / math.log(2), rel=1e-9)
    # JSONL and text files give the same documents
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    assert dj.eval.perplexity(model, tmp_path / "d.jsonl")["nll"] == pytest.approx(
        res["nll"], rel=1e-6
    )
    # with a prefix token every token is scored: direct sum over [prefix] + doc
    res = dj.eval.perplexity(model, docs[:1], prefix_token=10)
    seq = np.concatenate([[10], tokens[0]])
    logp = log_softmax(forward(model, seq[None, :-1])[0])
    want = -logp[np.arange(40), seq[1:]].sum()
    assert res["nll"] == pytest.approx(want, rel=1e-5) and res["tokens"] == 40


def naive_rolling_nll(model, ids, max_len, context_len, prefix):
    """Token by token: each token's context is what lm-eval's window for it reads."""
    pred, first = ids[1:], ids[0]
    starts = []  # for each predicted token j (index in pred): window input = seq[s:e]
    seq = np.concatenate([[first], pred])  # seq[j] precedes pred[j]
    n0 = min(max_len, len(pred))
    starts += [(0, j) for j in range(n0)]
    done, step = n0, max_len - context_len + 1
    while done < len(pred):
        n = min(len(pred) - done, step)
        end = done + n
        starts += [(end - max_len, j) for j in range(end - n, end)]
        done = end
    total, logp = 0.0, {}
    for s, j in starts:  # inputs seq[s:j+1]; causal, so read them off one forward from s
        if s not in logp:
            logp[s] = log_softmax(forward(model, seq[None, s : s + max_len])[0])
        total -= logp[s][j - s, pred[j]]
    return total, len(starts)


@pytest.mark.parametrize("context_len", [1, 5])
def test_rolling_windows_score_each_token_once_with_its_window(model, context_len):
    ids = np.random.default_rng(1).integers(0, 256, 45).astype(np.int32)
    doc = bytes(ids.astype(np.uint8)).decode("latin-1")
    res = dj.eval.Perplexity(
        [doc], tokenizer=_Latin1(), max_len=16, context_len=context_len
    ).evaluate(model)
    want, n = naive_rolling_nll(model, ids, 16, context_len, None)
    assert res["tokens"] == n == 44
    assert res["nll"] == pytest.approx(want, rel=1e-5)


def test_rolling_windows_match_lm_eval():
    lm_utils = import_lm_eval("lm_eval.utils")
    ids = list(range(1, 38))
    for max_len, context_len in ((8, 1), (8, 3), (40, 1)):
        ours = [
            (r.context.tolist(), r.continuation.tolist())
            for r in dj.eval.rolling_requests(ids, max_len, context_len=context_len, prefix_token=0)
        ]
        theirs = [
            tuple(map(list, lm_utils.make_disjoint_window(w)))
            for w in lm_utils.get_rolling_token_windows(ids, 0, max_len, context_len)
        ]
        assert ours == theirs


class _Latin1:
    """One token per character (code points < 256), so any byte string is a document."""

    vocab_size = 256

    def encode(self, text):
        return np.array([ord(c) for c in text], np.int32)

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


def naive_greedy(model, prompt: str, n: int) -> str:
    """Argmax token by token, recomputing the whole prefix each time (no KV cache); the
    buffer has a fixed length so one compile serves, and causality keeps it exact."""
    buf = np.zeros((1, 32), np.int32)
    buf[0, : len(prompt)] = [ord(c) for c in prompt]
    for t in range(len(prompt), len(prompt) + n):
        buf[0, t] = int(np.asarray(forward(model, buf)[0, t - 1]).argmax())
    return "".join(chr(i) for i in buf[0, len(prompt) : len(prompt) + n])


def test_generate_until_matches_greedy_loop_and_cuts_at_stop(model):
    prompts = ["def f(x):", "abc", "import os\nimport sys\n"]
    want = [naive_greedy(model, p, 6) for p in prompts]
    stop = want[0][3]  # a stop string the first continuation reaches
    got = dj.eval.generate_until(
        model, prompts, stop=[stop], max_new_tokens=6, tokenizer=_Latin1(), batch_size=2
    )
    assert got == [w[: w.find(stop)] if stop in w else w for w in want]
    examples = [{"context": p, "target": g} for p, g in zip(prompts, got)]
    examples[1]["target"] += "nope"
    res = dj.eval.exact_match(model, examples, stop=[stop], max_new_tokens=6, tokenizer=_Latin1())
    assert res["exact_match"] == pytest.approx(2 / 3) and res["hits"].tolist() == [
        True,
        False,
        True,
    ]


def test_representation_cosine_matches_numpy():
    bert = dj.init(dj.configs.get("bert-tiny"), jax.random.key(1))
    tokens = np.random.default_rng(2).integers(0, 256, (3, 10)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=np.float32)
    mask[1, 6:] = 0
    pruned = D.drop_sublayers(bert, mlp=[1], attn=[2])
    res = dj.eval.representation(
        bert, {"tokens": tokens, "mask": mask}, programs=[bert.program, pruned.program]
    )
    hidden = jax.jit(lambda m: dj.apply(m, tokens, mask=mask, output="hidden"))
    pool = lambda m: np.stack([np.asarray(hidden(m))[b][mask[b] > 0].mean(0) for b in range(3)])
    a, b = pool(bert), pool(pruned)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(res["cosine"], [1.0, cos.mean()], atol=1e-5)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"choices": ["a", "b"], "label": 0}', "t.jsonl:2: missing field context"),
        (
            '{"context": "c", "choices": ["a", "b"], "label": 2}',
            "t.jsonl:2: label 2 is not an index",
        ),
        (
            '{"context": "c", "choices": ["a"], "label": 0}',
            "t.jsonl:2: choices must be a list of at least two",
        ),
        ('{"context": "c", "choices": ["a", "b"]', "t.jsonl:2: invalid JSON"),
        (
            '{"context": "", "choices": ["a", "b"], "label": 0}',
            "t.jsonl:2: context must be a non-empty",
        ),
    ],
)
def test_bad_task_files_name_the_line(tmp_path, line, message):
    good = json.dumps({"context": "c", "choices": ["a", "b"], "label": 1})
    (tmp_path / "t.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(dj.eval.TaskError, match=message):
        dj.eval.MultipleChoice(tmp_path / "t.jsonl")


def test_empty_task_file_and_encoder_loglikelihood_are_errors(tmp_path, model):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(dj.eval.TaskError, match="has no examples"):
        dj.eval.load_task(tmp_path / "e.jsonl")
    bert = dj.init(dj.configs.get("bert-tiny"), jax.random.key(1))
    with pytest.raises(dj.eval.EvalError, match="bidirectional"):
        dj.eval.multiple_choice(bert, EXAMPLES)
    big = dj.init(dj.configs.get("llama-tiny", vocab_size=300), jax.random.key(0))
    with pytest.raises(dj.eval.EvalError, match="pass tokenizer="):
        dj.eval.multiple_choice(big, EXAMPLES)


# -- tasks as measures -------------------------------------------------------------------
def naive_choice_scores(model, examples):
    """(1 - acc, mean gold cross-entropy) from the unbatched reference log-likelihoods."""
    wrong = nll = 0.0
    for ex in examples:
        ctx = ex["context"].rstrip().encode()
        space = ex["context"][len(ex["context"].rstrip()) :].encode()
        lls = np.array([naive_loglik(model, ctx, space + c.encode())[0] for c in ex["choices"]])
        wrong += np.argmax(lls) != ex["label"]
        nll -= log_softmax(lls)[ex["label"]]
    return wrong / len(examples), nll / len(examples)


def test_task_ablation_equals_naive_leave_one_out_loop(model):
    acc_task = dj.eval.MultipleChoice(EXAMPLES, metric="acc")
    nll_task = dj.eval.MultipleChoice(EXAMPLES, metric="nll")
    by_acc = M.ablation(model, None, unit="attn", measure=acc_task)
    by_nll = M.ablation(model, None, unit="attn", measure=nll_task)
    full = naive_choice_scores(model, EXAMPLES)
    drops = [naive_choice_scores(D.drop_sublayers(model, attn=[i]), EXAMPLES) for i in range(4)]
    assert by_acc.name == "ablation_multiple_choice" and by_acc.extra["full"] == full[0]
    np.testing.assert_array_equal(by_acc.values, [d[0] - full[0] for d in drops])
    np.testing.assert_allclose(by_nll.values, [d[1] - full[1] for d in drops], atol=1e-5)
    # dj.prune by the task ranks as its leave-one-out scores do
    pruned = dj.prune(model, None, 2, unit="attn", measure=nll_task)
    want = dj.prune(model, by_nll, 2)
    np.testing.assert_array_equal(np.asarray(pruned.program.attn), np.asarray(want.program.attn))


def test_task_shapley_and_removal_curve_measure_each_program(model):
    task = dj.eval.MultipleChoice(EXAMPLES, metric="nll")
    sh = M.shapley(
        model, None, unit="block", num_permutations=2, key=jax.random.key(0), measure=task
    )
    off = model.with_program(
        model.program.replace(attn=model.program.attn * 0, mlp=model.program.mlp * 0)
    )
    v = lambda m: task.evaluate(m)["nll"]
    assert sh.extra["v_all_minus_v_none"] == pytest.approx(v(off) - v(model), rel=1e-5)
    np.testing.assert_allclose(sh.values.sum(), v(off) - v(model), rtol=1e-5)
    curve = M.removal_curve(model, None, sh, max_units=2, measure=task)
    order = np.argsort(sh.values, kind="stable")
    want = [
        v(model),
        v(D.drop_sublayers(model, attn=order[:1], mlp=order[:1])),
        v(D.drop_sublayers(model, attn=order[:2], mlp=order[:2])),
    ]
    np.testing.assert_allclose(curve, want, rtol=1e-5)


def test_module_similarity_matches_numpy(model):
    tokens = np.random.default_rng(4).integers(0, 256, (2, 12)).astype(np.int32)
    _, tr = dj.apply(model, tokens, trace=True)
    x, ua, um = (np.asarray(a, np.float64) for a in (tr.residual[:-1], tr.attn_out, tr.mlp_out))
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    want = np.concatenate(
        [(1 - cos(x, x + ua)).mean((1, 2)), (1 - cos(x + ua, x + ua + um)).mean((1, 2))]
    )
    s = M.module_similarity(model, tokens)
    assert s.unit == "sublayer"
    np.testing.assert_allclose(s.values, want, atol=1e-6)
