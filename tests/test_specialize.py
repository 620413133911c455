"""dj.specialize against dj.apply (and the naive reference forward) for every kind of
program, the sublayers its compiled function contains, gradients and generation."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.program import ProgramError
from depthjax.inference.sampling import GenerationError
from tests import reference
from tests.test_model import _model

D = dj.depth
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def base():
    return _model(dj.configs.get("llama-tiny"))


def _variants(model, tokens):
    looped = D.repeat(model, [1, 2], 3)
    return {
        "sequential": model,
        "dropped": D.drop(model, [1]),
        "attention-dropped": D.drop_sublayers(model, attn=[1, 2]),
        "mlp-dropped": D.drop_sublayers(model, mlp=[0, 3]),
        "looped": looped,
        "reordered": D.reorder(model, [3, 1, 1, 2, 0]),
        "tied+relaxed": D.relax(D.tie(model, 2, strategy="cycle", init="average"), model, rank=4),
        "parallel": D.parallelize(model, [[1, 2]]),
        "parallel-mean-gated": D.drop_sublayers(
            D.parallelize(looped, [[0, 1, 2], [4, 5]], combine="mean"), attn=[1], mlp=[2, 5]
        ),
        "recovered-bias": dj.recover(D.drop(model, [1, 3]), model, tokens, method="bias"),
        "recovered-linear": dj.recover(
            D.drop_sublayers(model, attn=[2], mlp=[2]), model, tokens, method="linear", rank=4
        ),
        "fractional-gates": model.with_program(
            dj.Program.create([0, 1, 2, 3], attn=[1, 0.5, 0, 2], mlp=[0.25, 1, 1, 0])
        ),
    }


@pytest.mark.slow
def test_specialize_equals_apply_for_every_program_kind(base, tokens):
    for name, model in _variants(base, tokens).items():
        fast = dj.specialize(model)
        np.testing.assert_allclose(fast(tokens), dj.apply(model, tokens), **TOL, err_msg=name)


def test_specialize_matches_naive_forward(base, tokens):
    groups = [[(3, 1.0, 1.0)], [(0, 1.0, 1.0), (2, 1.0, 0.0)], [(1, 0.0, 1.0)]]
    model = base.with_program(
        dj.Program.create([3, 0, 2, 1], attn=[1, 1, 1, 0], mlp=[1, 1, 0, 1], parallel=[0, 0, 1, 0])
    )
    np.testing.assert_allclose(
        dj.specialize(model)(tokens), reference.forward(model, tokens, groups), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("gpt2", dj.configs.get("gpt2-tiny")),
        ("bert", dj.configs.get("bert-tiny")),
        ("peri", dj.configs.get("llama-tiny", norm_placement="peri")),
        ("gptj", dj.configs.get("gpt2-tiny", parallel_block=True)),
    ],
)
def test_specialize_families(name, cfg, tokens):
    model = _model(cfg)
    model = D.drop_sublayers(D.parallelize(model, [[1, 2]]), attn=[2], mlp=[3])
    mask = np.ones(tokens.shape, np.float32)
    mask[0, :3] = 0
    output = "hidden" if name == "bert" else "logits"
    np.testing.assert_allclose(
        dj.specialize(model)(tokens, mask=mask, output=output),
        dj.apply(model, tokens, mask=mask, output=output),
        **TOL,
    )


def equations(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (scan bodies, pjit calls) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from equations(sub)


def executed_ops(closed_jaxpr) -> collections.Counter:
    """Primitive counts weighted by how often they run (scan bodies times their length)."""
    counts = collections.Counter()

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += times
            inner = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)  # a closed jaxpr (jax 0.11) or a jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub, inner)

    walk(closed_jaxpr.jaxpr, 1)
    return counts


ATTN_DOTS, MLP_DOTS, HEAD_DOTS = 6, 3, 1  # q, k, v, o + scores, values; gate, up, down


@pytest.mark.parametrize(
    "edit,attn_steps,mlp_steps",
    [
        (lambda m: m, 4, 4),
        (lambda m: D.drop_sublayers(m, attn=[1, 2]), 2, 4),
        (lambda m: D.drop_sublayers(m, attn=[0, 1, 2, 3], mlp=[3]), 0, 3),
        (lambda m: D.drop_sublayers(D.repeat(m, [1, 2], 2), attn=[3]), 5, 6),
        (lambda m: D.drop_sublayers(m, attn=[1], mlp=[1]), 3, 3),  # step 1 removed entirely
    ],
)
def test_compiled_function_contains_only_sublayers_that_run(
    base, tokens, edit, attn_steps, mlp_steps
):
    fast = dj.specialize(edit(base))
    ops = executed_ops(jax.make_jaxpr(lambda f: f(tokens))(fast))
    assert ops["dot_general"] == attn_steps * ATTN_DOTS + mlp_steps * MLP_DOTS + HEAD_DOTS
    assert ops["cond"] == 0  # nothing is decided at run time
    # dj.apply compiles every sublayer of every step (and skips at run time)
    apply_ops = executed_ops(jax.make_jaxpr(dj.apply)(edit(base), tokens))
    assert apply_ops["cond"] == 2 * edit(base).depth


def test_parallel_group_runs_as_one_batched_call(base, tokens):
    fast = dj.specialize(D.parallelize(base, [[0, 1, 2, 3]]))
    ops = executed_ops(jax.make_jaxpr(lambda f: f(tokens))(fast))
    # one vmapped block: each projection is one (wider or batched) matmul for all 4 rows
    assert ops["dot_general"] == ATTN_DOTS + MLP_DOTS + HEAD_DOTS
    # the members share the normalized input (norm gains folded into the kernels): q, k and
    # v are each one wider matmul over the 4 rows' kernels, not a batched one
    jaxpr = jax.make_jaxpr(lambda f: f(tokens))(fast).jaxpr
    dots = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"]
    wide = [e for e in dots if not e.params["dimension_numbers"][1][0]]  # no batch dims
    assert len(wide) == 3 + HEAD_DOTS
    assert all(e.outvars[0].aval.shape[2] == 4 for e in wide[:3])  # [B, T, rows, heads, Dh]


@pytest.mark.slow
def test_gradients_through_specialize_equal_apply(base, tokens):
    model = D.relax(
        D.tie(D.parallelize(D.drop_sublayers(base, attn=[3]), [[1, 2]]), 2), base, rank=2
    )
    fast = dj.specialize(model)
    with_params = lambda p: model.replace(params=p)
    g_fast = jax.grad(lambda p: jnp.sum(fast.replace(model=with_params(p))(tokens) ** 2))(
        model.params
    )
    g_apply = jax.grad(lambda p: jnp.sum(dj.apply(with_params(p), tokens) ** 2))(model.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_fast, g_apply
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: D.drop_sublayers(
            D.parallelize(D.repeat(m, [1, 2], 2), [[3, 4]]), attn=[2], mlp=[5]
        ),
        # runs of a repeated two-step pattern (attention at every other step), rows looping
        lambda m: D.drop_sublayers(D.repeat(m, [1, 2], 3), attn=[1, 3, 5, 7]),
    ],
    ids=["parallel-loop", "pattern-run"],
)
def test_generate_with_a_specialized_model(base, edit):
    model = edit(base)
    fast = dj.specialize(model)
    prompt = np.random.default_rng(1).integers(0, 256, (2, 6)).astype(np.int32)
    mask = np.ones_like(prompt)
    mask[0, :2] = 0  # left padding
    want = dj.generate(model, prompt, 5, mask=mask, temperature=0.0)
    got = dj.generate(fast, prompt, 5, mask=mask, temperature=0.0)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.cache.steps == want.cache.steps and got.cache.nbytes == want.cache.nbytes
    logits_a, cache_a = dj.prefill(model, prompt, mask, max_len=8)
    logits_b, cache_b = dj.prefill(fast, prompt, mask, max_len=8)
    np.testing.assert_allclose(logits_b, logits_a, **TOL)
    step_a = dj.decode_step(model, cache_a, prompt[:, 0])[0]
    step_b = dj.decode_step(fast, cache_b, prompt[:, 0])[0]
    np.testing.assert_allclose(step_b, step_a, **TOL)
    with pytest.raises(GenerationError, match="early exit"):
        dj.generate(fast, prompt, 2, temperature=0.0, exit_threshold=0.5)


def test_plan_reads_rows_in_runs(base):
    runs = lambda m: [(s.steps, s.rows, len(s.pattern)) for s in dj.specialize(m).plan.segments]
    # a loop, a drop and a reorder are each one scan over their rows, whatever the order
    assert runs(D.tie(base, 2)) == [((0, 1, 2, 3), (0, 1, 0, 1), 1)]
    assert runs(D.drop(base, [2])) == [((0, 1, 2), (0, 1, 3), 1)]
    assert runs(D.reorder(base, [3, 1, 1, 2, 0])) == [((0, 1, 2, 3, 4), (3, 1, 1, 2, 0), 1)]
    # alternating sublayers: a scan over repetitions of the two-step pattern
    alternating = D.drop_sublayers(base, attn=[1, 3])
    (run,) = dj.specialize(alternating).plan.segments
    assert (run.steps, run.times) == ((0, 1, 2, 3), 2)
    assert [(p.attn, p.mlp) for p in run.pattern] == [(True, True), (False, True)]
    # nothing repeats: single steps, and the longest repeat wins
    mixed = D.drop_sublayers(base, attn=[1], mlp=[3])
    assert runs(mixed) == [((0,), (0,), 1), ((1,), (1,), 1), ((2,), (2,), 1), ((3,), (3,), 1)]
    assert runs(D.drop_sublayers(base, attn=[0])) == [((0,), (0,), 1), ((1, 2, 3), (1, 2, 3), 1)]


def test_specialize_errors(base):
    with pytest.raises(ProgramError, match="concrete"):
        jax.jit(lambda m: dj.specialize(m).depth)(base)
    batched = base.replace(program=jax.tree.map(lambda a: jnp.stack([a, a]), base.program))
    with pytest.raises(ProgramError, match="one program"):
        dj.specialize(batched)
