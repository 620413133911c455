"""The scanned forward against an independent naive forward, and the Program semantics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.program import Program
from tests import reference

TOL = dict(rtol=2e-5, atol=2e-5)

FAMILIES = {
    "llama": dj.configs.get("llama-tiny"),
    "qwen2": dj.configs.get("qwen2-tiny"),
    "qwen3": dj.configs.get("qwen3-tiny"),
    "gpt2": dj.configs.get("gpt2-tiny"),
    "bert": dj.configs.get("bert-tiny"),
    "peri": dj.configs.get("llama-tiny", norm_placement="peri"),
    "post-llama": dj.configs.get("llama-tiny", norm_placement="post"),
    "gptj": dj.configs.get("gpt2-tiny", parallel_block=True),
}


def _model(cfg, seed=0):
    model = dj.init(cfg, jax.random.key(seed))
    # Norm scales and biases start at 1 and 0; perturb them so the test sees them used.
    leaves, tree = jax.tree.flatten_with_path(model.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape)
        if any(getattr(p, "key", None) in ("scale", "bias") for p in path)
        else x
        for (path, x), k in zip(leaves, keys)
    ]
    return model.replace(params=jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("name", FAMILIES)
def test_sequential_matches_naive_forward(name, tokens):
    model = _model(FAMILIES[name])
    want = reference.forward(model, tokens, reference.sequential(range(model.depth)))
    np.testing.assert_allclose(dj.apply(model, tokens), want, **TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_scan_equals_unrolled(name, tokens):
    model = _model(FAMILIES[name])
    model = model.with_program(
        Program.create([0, 2, 2, 1], attn=[1, 0, 1, 0.5], mlp=[1, 1, 0, 1], parallel=[0, 0, 1, 0])
    )
    scan_out, scan_trace = jax.jit(lambda m, t: dj.apply(m, t, trace=True))(model, tokens)
    unroll_out, unroll_trace = jax.jit(lambda m, t: dj.apply(m, t, trace=True, unroll=True))(
        model, tokens
    )
    np.testing.assert_allclose(scan_out, unroll_out, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        scan_trace,
        unroll_trace,
    )


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_future_tokens_do_not_change_past_logits(name, tokens):
    model = _model(FAMILIES[name])
    changed = tokens.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    a, b = dj.apply(model, tokens), dj.apply(model, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], **TOL)
    assert not np.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", ["llama", "bert", "peri"])
def test_gate_zero_equals_step_removed(name, tokens):
    model = _model(FAMILIES[name])
    gated = model.with_program(Program.create([0, 1, 2, 3], attn=[1, 0, 1, 1], mlp=[1, 0, 1, 1]))
    removed = model.with_program(Program.create([0, 2, 3]))
    np.testing.assert_allclose(dj.apply(gated, tokens), dj.apply(removed, tokens), **TOL)


def test_sublayer_gates_match_naive(tokens):
    model = _model(FAMILIES["llama"])
    prog = Program.create([0, 1, 2, 3], attn=[1, 0, 0.5, 1], mlp=[0, 1, 1, 2])
    groups = [[(b, float(a), float(m))] for b, a, m in zip([0, 1, 2, 3], prog.attn, prog.mlp)]
    np.testing.assert_allclose(
        dj.apply(model.with_program(prog), tokens), reference.forward(model, tokens, groups), **TOL
    )


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_parallel_groups(name, tokens):
    model = _model(FAMILIES[name])
    # A group of one is sequential: parallel=False everywhere is the default program.
    seq = dj.apply(model, tokens)
    want = reference.forward(model, tokens, reference.sequential(range(4)))
    np.testing.assert_allclose(seq, want, **TOL)
    # Steps 1 and 2 read the same input; their updates add up.
    par = model.with_program(Program.create([0, 1, 2, 3], parallel=[0, 0, 1, 0]))
    want = reference.forward(model, tokens, [[(0, 1, 1)], [(1, 1, 1), (2, 1, 1)], [(3, 1, 1)]])
    np.testing.assert_allclose(dj.apply(par, tokens), want, **TOL)
    assert not np.allclose(dj.apply(par, tokens), seq, atol=1e-3)


def test_block_listed_twice_is_applied_twice(llama, tokens):
    looped = llama.with_program(Program.create([0, 1, 1, 1, 2, 3]))
    want = reference.forward(llama, tokens, reference.sequential([0, 1, 1, 1, 2, 3]))
    np.testing.assert_allclose(dj.apply(looped, tokens), want, **TOL)


def test_trace_residuals_add_up(llama, tokens):
    prog = Program.create([3, 1, 0], attn=[1, 0.5, 0])
    logits, trace = dj.apply(llama.with_program(prog), tokens, trace=True)
    assert trace.residual.shape == (4, 2, 12, 64)
    assert trace.attn_out.shape == trace.mlp_out.shape == (3, 2, 12, 64)
    np.testing.assert_allclose(
        trace.residual[1:],
        trace.residual[:-1] + trace.attn_out + trace.mlp_out,
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(trace.attn_out[2], 0)
    hidden = dj.apply(llama.with_program(prog), tokens, output="hidden")
    want = reference.forward(llama, tokens, [[(3, 1, 1)], [(1, 0.5, 1)], [(0, 0, 1)]], hidden=True)
    np.testing.assert_allclose(hidden, want, **TOL)


def test_programs_of_equal_depth_compile_once(llama, tokens):
    traces = []

    @jax.jit
    def forward(model, tokens):
        traces.append(1)
        return dj.apply(model, tokens)

    rng = np.random.default_rng(0)
    outs = []
    for _ in range(6):
        prog = Program.create(
            rng.integers(0, 4, 5),
            attn=rng.random(5),
            mlp=rng.random(5),
            parallel=np.r_[False, rng.random(4) < 0.3],
        )
        outs.append(forward(llama.with_program(prog), tokens))
    assert len(traces) == 1 and forward._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])


def test_vmap_over_programs(llama, tokens):
    progs = [
        Program.create([0, 1, 2, 3], attn=[1, 1, 1, 1]),
        Program.create([3, 3, 0, 1], mlp=[0, 1, 1, 1]),
        Program.create([2, 1, 0, 0], parallel=[0, 1, 0, 1]),
    ]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *progs)
    many = jax.vmap(lambda p: dj.apply(llama.replace(program=p), tokens))(stacked)
    for i, prog in enumerate(progs):
        np.testing.assert_allclose(many[i], dj.apply(llama.with_program(prog), tokens), **TOL)


def test_bert_padding_does_not_change_real_tokens():
    model = _model(FAMILIES["bert"])
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 256, (2, 10)).astype(np.int32)
    types = np.r_[[0] * 5 + [1] * 5][None].repeat(2, 0)
    mask = np.ones((2, 10), np.int32)
    mask[1, 6:] = 0
    out = dj.apply(model, toks, mask=mask, token_types=types, output="hidden")
    want = reference.forward(
        model, toks, reference.sequential(range(4)), mask=mask, token_types=types, hidden=True
    )
    np.testing.assert_allclose(out, want, **TOL)
    garbage = toks.copy()
    garbage[1, 6:] = 7
    out2 = dj.apply(model, garbage, mask=mask, token_types=types, output="hidden")
    np.testing.assert_allclose(out[1, :6], out2[1, :6], **TOL)


def test_packed_segments_equal_separate_sequences(llama):
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, (1, 5)), rng.integers(0, 256, (1, 7))
    packed = np.concatenate([a, b], 1).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 7])
    out = dj.apply(llama, packed, segment_ids=seg)
    np.testing.assert_allclose(out[:, :5], dj.apply(llama, a.astype(np.int32)), **TOL)
    np.testing.assert_allclose(out[:, 5:], dj.apply(llama, b.astype(np.int32)), **TOL)


def test_bf16_compute_keeps_fp32_params(tokens):
    cfg = dj.configs.get("llama-tiny", dtype="bfloat16")
    model = dj.init(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.params))
    logits, trace = dj.apply(model, tokens, trace=True)
    assert logits.dtype == jnp.float32 and trace.residual.dtype == jnp.bfloat16
    fp32 = dj.apply(model.replace(config=dataclasses.replace(cfg, dtype="float32")), tokens)
    np.testing.assert_allclose(logits, fp32, atol=0.05)


@pytest.mark.parametrize(
    "remat",
    [r if r == dj.Remat.NONE else pytest.param(r, marks=pytest.mark.slow) for r in dj.Remat],
)
def test_remat_policies_keep_gradients(llama, tokens, remat):
    def loss(params, cfg):
        model = dj.DepthModel(cfg, params, llama.program)
        return jnp.mean(dj.apply(model, tokens) ** 2)

    want = jax.grad(loss)(llama.params, llama.config)
    got = jax.jit(jax.grad(loss), static_argnums=1)(llama.params, llama.config.replace(remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    # The table receives the gradient of every step that gathered its row.
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(got["blocks"]))


def test_layers_are_usable_alone(tokens):
    from depthjax.core.layers import MLP, Attention

    cfg = dj.configs.get("llama-tiny")
    x = jax.random.normal(jax.random.key(0), (2, 12, 64))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    attn = Attention(cfg)
    params = attn.init(jax.random.key(1), x, pos)["params"]
    y = attn.apply({"params": params}, x, pos)
    allowed = np.tril(np.ones((12, 12), bool))[None].repeat(2, 0)
    np.testing.assert_allclose(y, reference._attention(cfg, params, x, pos, allowed), **TOL)
    mlp = MLP(cfg)
    mp = mlp.init(jax.random.key(2), x)["params"]
    np.testing.assert_allclose(mlp.apply({"params": mp}, x), reference._mlp(cfg, mp, x), **TOL)


def test_n_params_counts_the_table_once():
    cfg = dj.configs.get("llama-tiny")  # untied head, RMSNorm, GQA, SwiGLU
    model = dj.init(cfg, jax.random.key(0))
    D, F, V, Dh = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    attn = D * cfg.n_heads * Dh * 2 + D * cfg.n_kv_heads * Dh * 2  # q, o; k, v
    block = attn + 3 * D * F + 2 * D  # gate, up, down; 2 norms
    embed_head = V * D + D + D * V  # tokens, final norm, out
    assert model.n_params == cfg.n_layers * block + embed_head
    # A program is not parameters: a looped walk of two table rows stores two blocks.
    tied = dj.depth.compact(model.with_program(dj.Program.create([0, 1, 0, 1])))
    assert tied.n_params == 2 * block + embed_head
    # Abstract parameters count the same (training reports the count before it allocates).
    abstract = jax.eval_shape(lambda k: dj.init(cfg, k).params, jax.random.key(0))
    assert dj.core.model.count_params(abstract) == model.n_params
