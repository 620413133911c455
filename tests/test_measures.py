"""Every measure of depthjax.metrics (logit, hidden, and the tasks of depthjax.eval; the
loss is test_metrics.py's test_coalition_strategies_match_separate_forwards) through both
evaluation strategies, against each program run alone by dj.apply."""

import jax
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
import depthjax.metrics as M
from depthjax.metrics import strategies

RNG = np.random.default_rng(3)
BATCHES = [RNG.integers(0, 256, (3, 12)).astype(np.int32) for _ in range(2)]
MASK = np.ones((3, 12), np.float32)
MASK[1, 8:] = 0  # padding in one row
DATA = [{"tokens": BATCHES[0], "mask": MASK}, BATCHES[1]]
# the full model, three leave-one-outs (attn 0, mlp 1, attn 3) and two random coalitions
KEEP = np.vstack([np.ones(8), 1 - np.eye(8)[[0, 5, 3]], RNG.integers(0, 2, (2, 8))]).astype(np.int8)
_apply = jax.jit(dj.apply, static_argnames=("output",))


def gated(model):
    """`model` on a program with a parallel group, fractional gates and a gated-off MLP."""
    return D.parallelize(model, [[0, 1]]).with_program(
        dj.Program.create(
            [0, 1, 2, 3], attn=[1, 0.5, 1, 1], mlp=[1, 1, 0, 2], parallel=[0, 1, 0, 0]
        )
    )


@pytest.fixture(scope="module")
def llama():
    return gated(dj.init(dj.configs.get("llama-tiny"), jax.random.key(2)))


@pytest.fixture(scope="module")
def bert():
    return gated(dj.init(dj.configs.get("bert-tiny"), jax.random.key(4)))


def coalition(model, keep):
    p = model.program
    return model.replace(program=p.replace(attn=p.attn * keep[:4], mlp=p.mlp * keep[4:]))


def data():
    """(tokens [B, T], mask [B, T]) of each batch of DATA."""
    for b in DATA:
        yield (b["tokens"], b["mask"]) if isinstance(b, dict) else (b, np.ones(b.shape))


def run(model, tokens, mask, output="logits"):
    return np.asarray(_apply(model, tokens, mask=mask, output=output), np.float64)


def naive_distance(model, keep, output):
    """Mean L2 distance per real token of the coalition's output to the full model's."""
    total = count = 0.0
    for tokens, mask in data():
        full, out = (run(m, tokens, mask, output) for m in (model, coalition(model, keep)))
        dist = np.linalg.norm(out - full, axis=-1)
        total, count = total + (dist * mask).sum(), count + mask.sum()
    return total / count


def naive_representation(model, keep):
    """1 - mean cosine of mean-pooled final hidden states to the full model's."""
    cos = []
    for tokens, mask in data():
        full, out = (
            np.stack([h[mask[r] > 0].mean(0) for r, h in enumerate(run(m, tokens, mask, "hidden"))])
            for m in (model, coalition(model, keep))
        )
        norms = np.linalg.norm(out, axis=-1) * np.linalg.norm(full, axis=-1)
        cos += list((out * full).sum(-1) / norms)
    return 1 - np.mean(cos)


EXAMPLES = [
    {"context": "the cat sat on the", "choices": [" mat", " moon", " xyz"], "label": 0},
    {"context": "one two three", "choices": [" four", " five"], "label": 0},
]


def naive_choice_nll(model, keep):
    """Mean over examples of logsumexp(choice log-likelihoods) - the gold one's."""
    m, out = coalition(model, keep), []
    for ex in EXAMPLES:
        ll = []
        for choice in ex["choices"]:
            ctx, cont = list(ex["context"].encode()), list(choice.encode())
            seq = np.array([ctx + cont], np.int32)
            logits = np.asarray(_apply(m, seq[:, :-1]), np.float64)[0]
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            targets = seq[0, 1:]
            ll.append(sum(logp[t, targets[t]] for t in range(len(ctx) - 1, len(targets))))
        ll = np.array(ll)
        out.append(np.log(np.exp(ll).sum()) - ll[ex["label"]])
    return np.mean(out)


CASES = {
    "logit": ("llama", "logit", lambda m, k: naive_distance(m, k, "logits")),
    "hidden": ("bert", "hidden", lambda m, k: naive_distance(m, k, "hidden")),
    "representation": (
        "bert",
        lambda: dj.eval.Representation(DATA),
        naive_representation,
    ),
    "multiple_choice": (
        "llama",
        lambda: dj.eval.MultipleChoice(EXAMPLES, metric="nll", batch_size=4),
        naive_choice_nll,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_strategies_equal_naive_forwards_for_every_measure(case, request):
    """Each measure by "batched" and "prefix" equals each coalition run alone by dj.apply,
    on a program with a parallel group (prefixes start at group boundaries), fractional
    gates and a gated-off sublayer."""
    fixture, measure, naive = CASES[case]
    model = request.getfixturevalue(fixture)
    measure = measure() if callable(measure) else measure
    want = np.array([naive(model, row) for row in KEEP])
    for strategy in ("batched", "prefix"):
        got = M.coalition_measures(model, DATA, "sublayer", KEEP, measure, strategy=strategy)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=strategy)


def test_auto_takes_the_strategy_with_fewer_flops(bert):
    """Leave-one-out programs share prefixes: "prefix"; a program that differs at step 0
    shares none, and when it does not read the full output either, "batched" computes
    less (no traced forward). The head counts only where a measure reads logits."""
    n = bert.depth
    leave_one_out = M.coalitions.programs_for(bert, "block", np.vstack([np.ones(n), 1 - np.eye(n)]))
    hidden = strategies.Reduction(None, "hidden", full=True)  # costs read no fn
    assert strategies.choose("auto", bert, leave_one_out, 19, hidden) == "prefix"
    first_off = M.coalitions.programs_for(bert, "attn", [[0, 1, 1, 1]])
    assert strategies.choose("auto", bert, first_off, 19, strategies.Reduction(None)) == "batched"
    assert strategies.choose("auto", bert, first_off, 19, hidden) == "prefix"
    logits = strategies.evaluation_costs(bert, leave_one_out, 19)
    hid = strategies.evaluation_costs(bert, leave_one_out, 19, hidden)
    head = 2.0 * bert.config.d_model * bert.config.vocab_size
    np.testing.assert_allclose(logits["prefix"] - hid["prefix"], (n + 2) * head)
    shallow = bert.replace(program=dj.Program.sequential(3))
    assert strategies.choose("auto", shallow, leave_one_out, 19, hidden) == "batched"
    with pytest.raises(M.MetricError, match="need its depth 3"):
        strategies.choose("prefix", shallow, leave_one_out, 19, hidden)


def test_logit_on_an_encoder_is_refused_by_name(bert):
    """An encoder has no LM head: measure="logit" names measure="hidden" instead of
    reading a projection onto the vocabulary the encoder never makes."""
    with pytest.raises(M.MetricError, match="no LM head.*measure='hidden'"):
        M.ablation(bert, DATA, measure="logit")
    with pytest.raises(M.MetricError, match="measure='hidden'"):
        M.ablation(bert, DATA)  # the loss: no next-token probabilities either
    hidden = M.ablation(bert, DATA, measure="hidden")
    assert hidden.name == "ablation_hidden" and hidden.extra["full"] == 0
    assert (hidden.values > 0).all()


def test_a_task_without_strategy_is_told_so(llama):
    class Plain:
        name = "plain"

        def measure(self, model, programs):
            return np.zeros(programs.block.shape[0])

    assert M.ablation(llama, None, measure=Plain()).values.tolist() == [0.0] * 4
    with pytest.raises(M.MetricError, match="takes no strategy="):
        M.coalition_measures(llama, None, "block", np.ones((1, 4)), Plain(), strategy="prefix")


@pytest.mark.slow  # ~30 s on the 2-core machine: two compiles of a 22M-parameter model
def test_ablation_ranking_is_the_same_in_bfloat16_and_float32(minilm_dir):
    """Issue #29's test on the real all-MiniLM-L6-v2: the leave-one-out ranking of its 6
    blocks by the representation measure (its own mean pooling, normalized) on 32 English
    sentences of 19 tokens is the same with bfloat16 weights and compute as in float32,
    and each value within 2% (the closest two blocks' values are ~4% apart)."""
    from tests.minilm_weights import sentences

    pooling = dj.hf.sentence_pooling(str(minilm_dir))
    task = dj.eval.Representation(
        sentences(32, 19), pooling=pooling["mode"], normalize=pooling["normalize"]
    )
    with pytest.warns(UserWarning, match="pooler"):  # the classifier pooler is not modelled
        f32, bf16 = (
            dj.hf.load(str(minilm_dir), param_dtype=d, dtype=d) for d in ("float32", "bfloat16")
        )
    f32, bf16 = (M.ablation(m, None, measure=task) for m in (f32, bf16))
    assert f32.order().tolist() == bf16.order().tolist(), (f32.values, bf16.values)
    np.testing.assert_allclose(bf16.values, f32.values, rtol=0.02)
