"""A naive transformer forward written independently of depthjax's modules: plain jnp on
the parameter dictionaries, a Python loop over layers, explicit masks (sliding windows
per row from `layer_types`), heads repeated for GQA, RoPE as a complex rotation (plain
RoPE only: the scaled variants are checked against transformers). Tests compare depthjax
against it."""

import jax
import jax.numpy as jnp
import numpy as np


def _norm(p, x, eps, kind, axes=(-1,)):
    if kind == "rms":
        return x / jnp.sqrt(jnp.mean(x * x, axes, keepdims=True) + eps) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p, x, spec):
    y = jnp.einsum(spec, x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def _rope(x, pos, theta, fraction=1.0):
    rot = int(x.shape[-1] * fraction)
    half = rot // 2
    freq = theta ** (-np.arange(half) / half)
    z = (x[..., :half] + 1j * x[..., half:rot]) * np.exp(1j * pos[:, :, None, None] * freq)
    return jnp.concatenate([z.real, z.imag, x[..., rot:]], -1).astype(x.dtype)


def _local(cfg, row_id):
    return cfg.layer_types is not None and cfg.layer_types[row_id] == "L"


def _attention(cfg, p, x, pos, allowed, row_id=0):
    if cfg.rope_scaling is not None:
        raise NotImplementedError(
            "the naive reference has plain RoPE only; scaled RoPE is checked against "
            "transformers (tests/test_hf_parity.py)"
        )
    q = _dense(p["q"], x, "btd,dhk->bthk")
    k = _dense(p["k"], x, "btd,dhk->bthk")
    v = _dense(p["v"], x, "btd,dhk->bthk")
    if cfg.qk_norm:
        axes = (-2, -1) if cfg.qk_norm == "full" else (-1,)
        q = _norm(p["q_norm"], q, cfg.norm_eps, "rms", axes)
        k = _norm(p["k_norm"], k, cfg.norm_eps, "rms", axes)
    if cfg.position == "rope":
        theta = cfg.rope_theta
        if _local(cfg, row_id) and cfg.local_rope_theta is not None:
            theta = cfg.local_rope_theta
        q, k = _rope(q, pos, theta, cfg.rope_fraction), _rope(k, pos, theta, cfg.rope_fraction)
    scale_dim = cfg.head_dim if cfg.query_scale_dim is None else cfg.query_scale_dim
    if _local(cfg, row_id):
        T = x.shape[1]
        t, u = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = allowed & (t - u < cfg.sliding_window)[None]
    o = attend(q, k, v, allowed, 1 / np.sqrt(scale_dim), cfg.attn_softcap)
    return _dense(p["o"], o, "bthk,hkd->btd")


def attend(q_BTHD, k_BSKD, v_BSKD, allowed_BTS, scale, softcap=None):
    """Softmax attention with an explicit boolean mask [B, T, S] (heads repeated for GQA,
    optional logit soft-cap); a query row that sees no key averages V uniformly."""
    rep = q_BTHD.shape[2] // k_BSKD.shape[2]
    k, v = jnp.repeat(k_BSKD, rep, axis=2), jnp.repeat(v_BSKD, rep, axis=2)
    s = jnp.einsum("bthk,bshk->bhts", q_BTHD, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(allowed_BTS[:, None], s, -1e30)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), v)


def _mlp(cfg, p, x):
    if cfg.mlp in ("swiglu", "geglu"):
        gate = _dense(p["gate"], x, "btd,df->btf")
        act = jax.nn.silu(gate) if cfg.mlp == "swiglu" else jax.nn.gelu(gate, approximate=True)
        h = act * _dense(p["up"], x, "btd,df->btf")
    else:
        h = jax.nn.gelu(_dense(p["up"], x, "btd,df->btf"), approximate=cfg.mlp == "gelu_tanh")
    return _dense(p["down"], h, "btf,fd->btd")


def layer(cfg, p, x, pos, allowed, ga=1.0, gm=1.0, row_id=0):
    """One layer's output (not its update); `row_id` is the table row (its kind)."""
    n = lambda name, y: _norm(p[name], y, cfg.norm_eps, cfg.norm)
    attn = lambda y: _attention(cfg, p["attn"], y, pos, allowed, row_id)
    if cfg.parallel_block:
        h = n("attn_norm", x)
        return x + ga * attn(h) + gm * _mlp(cfg, p["mlp"], h)
    if cfg.norm_placement == "pre":
        h = x + ga * attn(n("attn_norm", x))
        return h + gm * _mlp(cfg, p["mlp"], n("mlp_norm", h))
    if cfg.norm_placement == "peri":
        h = x + ga * n("attn_out_norm", attn(n("attn_norm", x)))
        return h + gm * n("mlp_out_norm", _mlp(cfg, p["mlp"], n("mlp_norm", h)))
    if cfg.norm_placement == "out":
        h = x + ga * n("attn_out_norm", attn(x))
        return h + gm * n("mlp_out_norm", _mlp(cfg, p["mlp"], h))
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
    if cfg.embed_scale is not None:
        x = x * cfg.embed_scale
    if cfg.position == "learned":
        x = x + e["pos"]["embedding"][pos]
    if cfg.type_vocab_size:
        types = np.zeros_like(tokens) if token_types is None else token_types
        x = x + e["type"]["embedding"][types]
    if cfg.embed_norm:
        x = _norm(e["norm"], x, cfg.norm_eps, cfg.norm)
    for group in groups:
        x = x + sum(
            layer(cfg, row(params, b), x, pos, allowed, ga, gm, b) - x for b, ga, gm in group
        )
    if cfg.final_norm:
        x = _norm(params["head"]["norm"], x, cfg.norm_eps, cfg.norm)
    if hidden:
        return x
    w = e["tok"]["embedding"].T if cfg.tie_embeddings else params["head"]["out"]["kernel"]
    logits = x @ w
    if cfg.final_softcap is not None:
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits


def sequential(blocks):
    """groups for running table rows `blocks` one after another with gates 1."""
    return [[(b, 1.0, 1.0)] for b in blocks]
