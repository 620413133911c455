"""A naive transformer forward written independently of depthjax's modules: plain jnp on
the parameter dictionaries, a Python loop over layers, explicit masks, heads repeated for
GQA, RoPE as a complex rotation. Tests compare depthjax against it."""

import jax
import jax.numpy as jnp
import numpy as np


def _norm(p, x, eps, kind):
    if kind == "rms":
        return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p, x, spec):
    y = jnp.einsum(spec, x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def _rope(x, pos, theta):
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half) / half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[:, :, None, None] * freq)
    return jnp.concatenate([z.real, z.imag], -1).astype(x.dtype)


def _attention(cfg, p, x, pos, allowed):
    q = _dense(p["q"], x, "btd,dhk->bthk")
    k = _dense(p["k"], x, "btd,dhk->bthk")
    v = _dense(p["v"], x, "btd,dhk->bthk")
    if cfg.qk_norm:
        q = _norm(p["q_norm"], q, cfg.norm_eps, "rms")
        k = _norm(p["k_norm"], k, cfg.norm_eps, "rms")
    if cfg.position == "rope":
        q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.head_dim)
    s = jnp.where(allowed[:, None], s, -1e30)
    o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), v)
    return _dense(p["o"], o, "bthk,hkd->btd")


def _mlp(cfg, p, x):
    if cfg.mlp == "swiglu":
        h = jax.nn.silu(_dense(p["gate"], x, "btd,df->btf")) * _dense(p["up"], x, "btd,df->btf")
    else:
        h = jax.nn.gelu(_dense(p["up"], x, "btd,df->btf"), approximate=cfg.mlp == "gelu_tanh")
    return _dense(p["down"], h, "btf,fd->btd")


def layer(cfg, p, x, pos, allowed, ga=1.0, gm=1.0):
    """One layer's output (not its update)."""
    n = lambda name, y: _norm(p[name], y, cfg.norm_eps, cfg.norm)
    attn = lambda y: _attention(cfg, p["attn"], y, pos, allowed)
    if cfg.parallel_block:
        h = n("attn_norm", x)
        return x + ga * attn(h) + gm * _mlp(cfg, p["mlp"], h)
    if cfg.norm_placement == "pre":
        h = x + ga * attn(n("attn_norm", x))
        return h + gm * _mlp(cfg, p["mlp"], n("mlp_norm", h))
    if cfg.norm_placement == "peri":
        h = x + ga * n("attn_out_norm", attn(n("attn_norm", x)))
        return h + gm * n("mlp_out_norm", _mlp(cfg, p["mlp"], n("mlp_norm", h)))
    h = n("attn_norm", x + attn(x)) if ga else x
    return n("mlp_norm", h + _mlp(cfg, p["mlp"], h)) if gm else h


def row(params, i):
    return jax.tree.map(lambda t: t[i], params["blocks"])


def forward(model, tokens, groups, *, mask=None, token_types=None, hidden=False):
    """groups: list of steps, each step a list of (table_row, attn_gate, mlp_gate) that read
    the same input and whose updates are summed. Returns logits (or final hidden states)."""
    cfg, params = model.config, model.params
    B, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (B, T))
    allowed = np.ones((B, T, T), bool)
    if cfg.causal:
        allowed &= np.tril(np.ones((T, T), bool))
    if mask is not None:
        allowed &= np.asarray(mask, bool)[:, None, :]
    e = params["embed"]
    x = e["tok"]["embedding"][tokens]
    if cfg.position == "learned":
        x = x + e["pos"]["embedding"][pos]
    if cfg.type_vocab_size:
        types = np.zeros_like(tokens) if token_types is None else token_types
        x = x + e["type"]["embedding"][types]
    if cfg.embed_norm:
        x = _norm(e["norm"], x, cfg.norm_eps, cfg.norm)
    for group in groups:
        x = x + sum(layer(cfg, row(params, b), x, pos, allowed, ga, gm) - x for b, ga, gm in group)
    if cfg.final_norm:
        x = _norm(params["head"]["norm"], x, cfg.norm_eps, cfg.norm)
    if hidden:
        return x
    w = e["tok"]["embedding"].T if cfg.tie_embeddings else params["head"]["out"]["kernel"]
    return x @ w


def sequential(blocks):
    """groups for running table rows `blocks` one after another with gates 1."""
    return [[(b, 1.0, 1.0)] for b in blocks]
