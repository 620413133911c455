"""Mixture-of-Depths against independent references: the plain model (capacity 1, fresh
routers), a dense masked computation written with tests/reference.py (gathered routing),
dropping the routed steps (capacity below one token), future-token perturbations (the
causal predictor), and the full causal forward (decoding with a routed KV cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.adaptive import AdaptiveError, mod, routed_decode
from tests import reference

ROUTED = [1, 3]


@pytest.fixture(scope="module")
def routed_model(llama):
    """llama-tiny (conftest) with routers on every step, random router weights."""
    base = llama
    model, _ = mod.attach(base, ROUTED, 0.5, jax.random.key(1))
    p = model.params["steps"]["mod"]
    p["router"] = 0.3 * jax.random.normal(jax.random.key(2), p["router"].shape)
    return base, model


def _tokens(B=2, T=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, T)).astype(np.int32)


def _masked_reference(model, tokens, capacity):
    """Every step dense over all T tokens (tests/reference.layer), with routed steps'
    keys restricted to the top-k tokens by router weight and their updates scaled by
    selected * r: the computation gathering must reproduce, without any gathering."""
    cfg, params = model.config, model.params
    B, T = tokens.shape
    k = int(capacity * T)
    x = params["embed"]["tok"]["embedding"][tokens]
    pos = np.broadcast_to(np.arange(T), (B, T))
    causal = np.tril(np.ones((T, T), bool))[None]
    selections = []
    for i in range(model.depth):
        row = reference.row(params, int(model.program.block[i]))
        if i in ROUTED:
            r = 1.0 + np.asarray(x, np.float64) @ np.asarray(params["steps"]["mod"]["router"][i])
            top = np.argsort(-r, axis=1, kind="stable")[:, :k]
            sel = np.zeros((B, T), bool)
            np.put_along_axis(sel, top, True, axis=1)
            allowed = causal & sel[:, None, :]
            update = reference.layer(cfg, row, x, pos, allowed) - x
            x = x + (sel * r)[..., None].astype(np.float32) * update
            selections.append(sel)
        else:
            x = reference.layer(cfg, row, x, pos, causal)
    x = reference._norm(params["head"]["norm"], x, cfg.norm_eps, cfg.norm)
    return x @ params["head"]["out"]["kernel"], selections


def test_capacity_one_with_fresh_routers_is_the_plain_model(routed_model):
    base, _ = routed_model
    model, spec = mod.attach(base, ROUTED, 1.0, jax.random.key(1))
    tokens = _tokens()
    logits, routes = mod.apply(model, spec, tokens)
    want = reference.forward(base, tokens, reference.sequential(range(base.depth)))
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, dj.apply(base, tokens), rtol=1e-5, atol=1e-5)
    assert bool(routes.select.all()) and float(mod.step_fraction(spec, routes)) == 1.0


@pytest.mark.parametrize("capacity", [0.5])
def test_gathered_routing_equals_dense_masked_reference(routed_model, capacity):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, capacity)
    tokens = _tokens()
    logits, routes = mod.apply(model, spec, tokens)
    want, selections = _masked_reference(model, tokens, capacity)
    np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4)
    for i, sel in zip(ROUTED, selections):
        np.testing.assert_array_equal(routes.select[i], sel)
    k = int(capacity * tokens.shape[1])
    assert (np.asarray(routes.select[np.asarray(ROUTED)]).sum(-1) == k).all()


@pytest.mark.slow
def test_scan_equals_unrolled(routed_model):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    a, _ = mod.apply(model, spec, _tokens())
    b, _ = mod.apply(model, spec, _tokens(), unroll=True)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_capacity_below_one_token_skips_the_routed_steps(routed_model):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.05)  # floor(0.05 * 12) = 0 tokens
    tokens = _tokens()
    logits, routes = mod.apply(model, spec, tokens)
    np.testing.assert_allclose(
        logits, dj.apply(dj.depth.drop(model, ROUTED), tokens), rtol=1e-5, atol=1e-5
    )
    assert not bool(routes.select[np.asarray(ROUTED)].any())


def test_causal_predictor_never_reads_future_tokens(routed_model):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    tokens = _tokens(B=2, T=16)
    _, before = mod.apply(model, spec, tokens, routing="causal")
    assert 0 < float(before.select[np.asarray(ROUTED)].mean()) < 1  # real decisions
    topk_changed = False
    for t in (4, 9, 15):
        changed = tokens.copy()
        changed[:, t:] = (changed[:, t:] + 101) % 256
        for budget in (None, 5):
            logits_a, a = mod.apply(model, spec, tokens, routing="causal", budget=budget)
            logits_b, b = mod.apply(model, spec, changed, routing="causal", budget=budget)
            np.testing.assert_array_equal(a.select[:, :, :t], b.select[:, :, :t])
            np.testing.assert_allclose(logits_a[:, :t], logits_b[:, :t], rtol=1e-5, atol=1e-5)
        _, ta = mod.apply(model, spec, tokens)
        _, tb = mod.apply(model, spec, changed)
        topk_changed |= not np.array_equal(ta.select[:, :, :t], tb.select[:, :, :t])
    assert topk_changed, "top-k routing looks ahead; the perturbation must be able to show it"


@pytest.mark.slow
def test_router_and_predictor_get_gradients(routed_model):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    grads = jax.grad(lambda p: mod.loss(model.replace(params=p), spec, _tokens())[0])(model.params)[
        "steps"
    ]["mod"]
    assert float(jnp.abs(grads["predictor"]["w1"]).max()) > 0
    router = grads["router"]
    assert float(jnp.abs(router[np.asarray(ROUTED)]).min(1).max()) > 0  # routed steps learn
    assert float(jnp.abs(router[np.array([0, 2])]).max()) == 0  # dense steps do not


@pytest.mark.slow
def test_predictor_loss_trains_only_the_predictor(routed_model):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    grads = jax.grad(
        lambda p: mod.apply(model.replace(params=p), spec, _tokens())[1].predictor_loss
    )(model.params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["blocks"]))
    assert float(jnp.abs(grads["steps"]["mod"]["router"]).max()) == 0


@pytest.mark.slow
def test_routed_decoding_equals_full_causal_forward(routed_model):
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    tokens = _tokens(B=2, T=12, seed=3)
    routed_len = 5
    full, routes = mod.apply(model, spec, tokens, routing="causal", budget=routed_len)
    T0 = 5
    logits, cache, ran = routed_decode.prefill(
        model, tokens[:, :T0], max_len=12, mod=spec, routed_len=routed_len
    )
    np.testing.assert_allclose(logits, full[:, T0 - 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.moveaxis(ran, -1, 0), routes.select[:, :, :T0])
    for t in range(T0, 12):
        logits, cache, ran = routed_decode.decode_step(model, cache, tokens[:, t])
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(ran.T, routes.select[:, :, t])
    # each step's cache holds exactly the tokens that ran it, the budget caps routed steps
    entries = cache.entries()
    np.testing.assert_array_equal(entries, np.asarray(routes.select).sum(-1))
    assert entries[np.asarray(ROUTED)].max() <= routed_len < entries[0].min()
    full_size = routed_decode.RoutedCache.empty(
        model.config, routed_decode.Layout(cache.layout.routed, 12, 12, 0.0), 2
    )
    assert cache.nbytes == full_size.nbytes * (2 + 2 * routed_len / 12) / 4


@pytest.mark.slow
def test_generate_equals_teacher_forced_causal_forward_with_padding(routed_model):
    """Row 0 a full prompt, row 1 the last 5 of its tokens left-padded by 3: each row's
    greedy tokens and routing equal the causal forward over its real tokens."""
    _, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    prompt = _tokens(B=1, T=8, seed=5)
    batch = np.concatenate([prompt, np.pad(prompt[:, 3:], ((0, 0), (3, 0)))])
    mask = np.ones(batch.shape, bool)
    mask[1, :3] = False
    N = 4
    policy = routed_decode.Routed(mod=spec, routed_len=6)
    out = dj.generate(model, batch, N, mask=mask, temperature=0.0, policy=policy)
    toks, ran = out.tokens, out.ran
    for b, real in ((0, prompt[0]), (1, prompt[0, 3:])):
        seq = np.concatenate([real, np.asarray(toks[b])])[None]
        full, routes = mod.apply(model, spec, seq, routing="causal", budget=6)
        T = len(real)
        np.testing.assert_array_equal(toks[b], np.argmax(full[0, T - 1 : -1], -1))
        np.testing.assert_array_equal(ran[b], np.moveaxis(routes.select[:, 0, T - 1 : -1], 0, -1))


@pytest.mark.parametrize("capacity", [0, 0.0, -0.5, 1.5, "half"])
def test_bad_capacity_is_rejected(capacity):
    with pytest.raises(AdaptiveError, match="capacity"):
        mod.MoD.create(4, [1], capacity)


def test_bad_settings_are_rejected(routed_model):
    base, model = routed_model
    spec = mod.MoD.create(model.depth, ROUTED, 0.5)
    with pytest.raises(AdaptiveError, match="routers"):
        mod.apply(base, spec, _tokens())
    with pytest.raises(AdaptiveError, match="routing"):
        mod.apply(model, spec, _tokens(), routing="oracle")
    with pytest.raises(AdaptiveError, match="budget"):
        mod.apply(model, spec, _tokens(), routing="causal", budget=0)
    with pytest.raises(AdaptiveError, match="out of range"):
        mod.MoD.create(4, [4], 0.5)
    with pytest.raises(AdaptiveError, match="routed_len"):
        routed_decode.prefill(model, _tokens(), max_len=12, mod=spec, routed_len=13)
    with pytest.raises(dj.ProgramError, match="parallel"):
        mod.attach(dj.depth.parallelize(base, [[1, 2]]), [1], 0.5, jax.random.key(0))
