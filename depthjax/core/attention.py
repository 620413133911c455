"""The one attention entry point. Models call `attend`; `impl` picks the implementation.

Masks are described, not materialized, by the caller (causal flag, segment ids for packed
documents, key padding, a sliding window), so that fused kernels can use them without a
T x S mask. The window is an int that may be traced (each table row has its own, see
depthjax.core.kinds): query t sees keys s with t - s < window. Attention logit soft-capping
(Gemma 2: scores -> cap * tanh(scores / cap)) is a static float.

Implementations (``ModelConfig.attention_impl``):

* ``"xla"``    `jax.nn.dot_product_attention(implementation="xla")`, runs everywhere; when
  T * S > 4 * ``ModelConfig.attention_chunk`` ** 2 it runs blockwise instead
  (`depthjax.core.blockwise`: online softmax, memory linear in the context);
* ``"cudnn"``  cuDNN flash attention through the same JAX function (GPU, bf16/fp16; a
  traced window becomes a dense mask; no soft-capping);
* ``"pallas"`` depthjax's own kernels: `depthjax.kernels.flash_attention` (Triton backend)
  on GPU, the splash-attention wrapper on TPU; on CPU only in the Pallas interpreter,
  enabled by `pallas_interpret()` or ``DEPTHJAX_PALLAS_INTERPRET=1`` (for tests: slow);
* ``"auto"``   the first implementation whose capability check passes, in the order
  preferred on the backend; every fallback is logged once with its reason.

Forcing an implementation that cannot run raises `AttentionUnavailable` with the reason.
Decisions happen when the caller is traced (shapes and dtypes are static there).
Under a context mesh (`jax.set_mesh`), the Pallas kernels run inside `jax.shard_map`
with batch split over the mesh axes "data"/"fsdp" and heads over "tensor".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..errors import DepthjaxError
from .blockwise import blockwise_attention, use_blockwise
from .config import ATTENTION_IMPLS as IMPLS

log = logging.getLogger(__name__)


class AttentionUnavailable(DepthjaxError):
    """A forced attention implementation cannot run this problem on this backend."""


_interpret = os.environ.get("DEPTHJAX_PALLAS_INTERPRET", "") not in ("", "0")


@contextlib.contextmanager
def pallas_interpret(enabled: bool = True):
    """Let impl="pallas" run in the Pallas interpreter on CPU (for tests; affects tracing)."""
    global _interpret
    previous, _interpret = _interpret, enabled
    try:
        yield
    finally:
        _interpret = previous


def attention_mask(
    T: int, S: int, *, causal: bool, segment_ids_BT=None, kv_mask_BS=None, q_offset=0, window=None
):
    """Boolean mask [B or 1, 1, T, S]: True where query t may attend to key s.

    `q_offset` is the absolute position of query 0 among the keys (decoding with a cache).
    kv_mask_BS may also be [B, T, S]: a key mask per query (decoding with a cache).
    """
    mask = jnp.ones((1, 1, T, S), bool)
    q_pos = jnp.arange(T)[:, None] + q_offset
    if causal:
        mask = mask & (jnp.arange(S)[None, :] <= q_pos)[None, None]
    if window is not None:
        mask = mask & (q_pos - jnp.arange(S)[None, :] < window)[None, None]
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    if kv_mask_BS is not None:
        kv = kv_mask_BS.astype(bool)
        mask = mask & (kv[:, None] if kv.ndim == 3 else kv[:, None, None, :])
    return mask


# ------------------------------------------------------------------ capability registry
@dataclasses.dataclass(frozen=True)
class Problem:
    """What an implementation needs to know to say whether it can run."""

    backend: str  # "cpu" | "gpu" | "tpu"
    dtype: str
    head_dim: int
    T: int
    S: int
    causal: bool
    segments: bool  # packed documents (segment ids)
    kv_mask: bool  # key padding
    interpret: bool  # Pallas interpreter allowed (CPU testing)
    gpu_capability: tuple[int, int] | None = None
    window: bool = False  # a sliding window (its size is data)
    softcap: bool = False

    @classmethod
    def of(cls, q, k, *, causal, segment_ids_BT, kv_mask_BS, window=None, softcap=None) -> Problem:
        device = jax.devices()[0]
        capability = None
        if device.platform == "gpu" and getattr(device, "compute_capability", None):
            capability = tuple(int(x) for x in str(device.compute_capability).split(".")[:2])
        return cls(
            backend=device.platform,
            dtype=jnp.dtype(q.dtype).name,
            head_dim=q.shape[-1],
            T=q.shape[1],
            S=k.shape[1],
            causal=causal,
            segments=segment_ids_BT is not None,
            kv_mask=kv_mask_BS is not None,
            interpret=_interpret,
            gpu_capability=capability,
            window=window is not None,
            softcap=softcap is not None,
        )


def _why_not_cudnn(p: Problem) -> str | None:
    if p.backend != "gpu":
        return f"cuDNN attention needs a GPU (backend is {p.backend})"
    if p.gpu_capability is not None and p.gpu_capability < (8, 0):
        return f"cuDNN flash attention needs compute capability >= 8.0, got {p.gpu_capability}"
    if p.dtype not in ("bfloat16", "float16"):
        return f"cuDNN attention supports bfloat16/float16 only, got {p.dtype}"
    if p.head_dim > 128 or p.head_dim % 8:
        return f"cuDNN attention needs head_dim <= 128 and a multiple of 8, got {p.head_dim}"
    if p.softcap:
        return "cuDNN attention has no logit soft-capping"
    return None


def _why_not_pallas(p: Problem) -> str | None:
    if p.causal and p.T != p.S:
        return f"the Pallas kernels need T == S for causal attention (T={p.T}, S={p.S})"
    if p.dtype not in ("float32", "bfloat16", "float16"):
        return f"the Pallas kernels support float32/bfloat16/float16, got {p.dtype}"
    if p.backend == "gpu":
        pow2 = p.head_dim & (p.head_dim - 1) == 0
        if not (pow2 and 16 <= p.head_dim <= 256):
            return f"the Triton kernel needs head_dim a power of two in [16, 256], got {p.head_dim}"
        if p.gpu_capability is not None and p.gpu_capability < (8, 0) and p.dtype == "bfloat16":
            return f"bfloat16 Triton kernels need compute capability >= 8.0, got {p.gpu_capability}"
        return None
    if p.backend == "tpu":
        if p.head_dim % 128:
            return f"splash attention is used with head_dim a multiple of 128, got {p.head_dim}"
        if p.window:
            return "splash attention takes its window as a static mask; per-row windows are data"
        return None
    if p.interpret:
        return None
    return (
        f"the Pallas kernels compile for GPU/TPU only (backend is {p.backend}); "
        "use pallas_interpret() or DEPTHJAX_PALLAS_INTERPRET=1 to run them interpreted"
    )


CAPABILITIES = {"xla": lambda p: None, "cudnn": _why_not_cudnn, "pallas": _why_not_pallas}
# Order `auto` tries on each backend: measured cuDNN leads on H100 (see benchmarks/attention.py).
AUTO_ORDER = {"gpu": ("cudnn", "pallas", "xla"), "tpu": ("pallas", "xla")}
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def choose(impl: str, problem: Problem) -> str:
    """The implementation that will run: `impl` itself if forced, else auto's pick."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        reason = CAPABILITIES[impl](problem)
        if reason:
            raise AttentionUnavailable(f"attention_impl={impl!r} cannot run: {reason}")
        return impl
    for candidate in AUTO_ORDER.get(problem.backend, ("xla",)):
        reason = CAPABILITIES[candidate](problem)
        if (
            candidate == "cudnn"
            and not reason
            and (problem.segments or problem.kv_mask or problem.window)
        ):
            reason = (
                "cuDNN would need a dense T x S mask for segment ids / key padding / "
                "a per-row window"
            )
        if not reason:
            return candidate
        # An accelerator ending on xla is a real performance surprise; say it loudly.
        level = logging.WARNING if problem.backend != "cpu" else logging.INFO
        _log_once(level, f"attention auto: skipping {candidate}: {reason}")
    return "xla"


# -------------------------------------------------------------------------- execution
def _pallas(
    q, k, v, *, causal, segment_ids_BT, kv_mask_BS, scale, window, softcap, backend, interpret
):
    from depthjax.kernels.flash import KV_PAD_SEGMENT, flash_attention
    from depthjax.kernels.splash import splash_attention

    kv_seg = None
    if kv_mask_BS is not None:  # key padding = keys in a segment no query belongs to
        seg = (
            segment_ids_BT if segment_ids_BT is not None else jnp.zeros(kv_mask_BS.shape, jnp.int32)
        )
        kv_seg = jnp.where(kv_mask_BS.astype(bool), seg.astype(jnp.int32), KV_PAD_SEGMENT)
        segment_ids_BT = seg
    if backend == "tpu":  # no window here: the capability check sends windows to xla
        return splash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=segment_ids_BT,
            kv_segment_ids=kv_seg,
            scale=scale,
            softcap=softcap,
            interpret=interpret,
        )
    return flash_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids_BT,
        kv_segment_ids=kv_seg,
        scale=scale,
        window=window,
        softcap=softcap,
        interpret=interpret,
    )


def _context_mesh():
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    return mesh if mesh is not None and not mesh.empty and mesh.size > 1 else None


def _sharded(fn, mesh, q, k, v, segment_ids_BT, kv_mask_BS, window):
    """Run `fn` per shard: batch over data/fsdp axes, heads over tensor (when they divide)."""
    B, K = q.shape[0], k.shape[2]
    names = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch = tuple(a for a in ("data", "fsdp") if a in names)
    if B % math.prod(names[a] for a in batch):
        batch = ()
    heads = "tensor" if "tensor" in names and K % names["tensor"] == 0 else None
    b = batch or None
    qkv = P(b, None, heads, None)
    seg = P(b, None)
    args = (q, k, v, segment_ids_BT, kv_mask_BS, window)
    specs = (
        qkv,
        qkv,
        qkv,
        None if segment_ids_BT is None else seg,
        None if kv_mask_BS is None else seg,
        None if window is None else P(),
    )
    # check_vma=False: pallas_call outputs carry no varying-manual-axes annotation.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def _xla_softcap(q_BTHD, k_BSKD, v_BSKD, mask, *, scale, softcap):
    """Explicit softmax attention with soft-capped logits (jax.nn has no soft-capping)."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    q = q_BTHD.reshape(B, T, K, H // K, D)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32) * (
        D**-0.5 if scale is None else scale
    )
    s_BKGTS = softcap * jnp.tanh(s_BKGTS / softcap)
    if mask is not None:  # [B or 1, 1, T, S]
        s_BKGTS = jnp.where(mask[:, :, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKD.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v_BSKD).reshape(B, T, H, D)


def attend(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    *,
    causal: bool,
    segment_ids_BT=None,
    kv_mask_BS=None,
    scale: float | None = None,
    window=None,
    softcap: float | None = None,
    impl: str = "xla",
    chunk: int = 0,
):
    """Softmax attention; H must be a multiple of K (grouped-query). Returns [B, T, H, D].

    window: int (may be traced): query t sees keys s with t - s < window (causal only, T
    and S aligned at 0). softcap: logits become softcap * tanh(logits / softcap).
    Query rows that can see no key: xla/cudnn average V uniformly, pallas returns zeros.
    A per-query key mask kv_mask_BS [B, T, S] (decoding from a cache) runs on xla only.
    chunk: xla (soft-capped or not) runs blockwise, in blocks of `chunk` queries and keys
    (`depthjax.core.blockwise`), when T * S > 4 * chunk ** 2; 0 always holds the dense T x S
    scores. Same numbers up to float reassociation.
    """
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    if kv_mask_BS is not None and kv_mask_BS.ndim == 3:
        if impl not in ("xla", "auto"):
            raise AttentionUnavailable(
                f"attention_impl={impl!r} cannot run: a per-query key mask [B, T, S] needs xla"
            )
        impl = "xla"
    problem = Problem.of(
        q_BTHD,
        k_BSKD,
        causal=causal,
        segment_ids_BT=segment_ids_BT,
        kv_mask_BS=kv_mask_BS,
        window=window,
        softcap=softcap,
    )
    chosen = choose(impl, problem)
    if chosen == "pallas":

        def run(q, k, v, seg, kv_mask, win):
            return _pallas(
                q,
                k,
                v,
                causal=causal,
                segment_ids_BT=seg,
                kv_mask_BS=kv_mask,
                scale=scale,
                window=win,
                softcap=softcap,
                backend=problem.backend,
                interpret=problem.backend == "cpu",
            )

        mesh = _context_mesh()
        if mesh is None:
            return run(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, kv_mask_BS, window)
        return _sharded(run, mesh, q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, kv_mask_BS, window)
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    if chosen == "xla" and use_blockwise(T, S, chunk):
        return blockwise_attention(
            q_BTHD,
            k_BSKD,
            v_BSKD,
            causal=causal,
            segment_ids_BT=segment_ids_BT,
            kv_mask_BS=kv_mask_BS,
            scale=scale,
            window=window,
            softcap=softcap,
            chunk=chunk,
        )
    mask = None
    if segment_ids_BT is not None or kv_mask_BS is not None or window is not None:
        mask = attention_mask(
            T, S, causal=False, segment_ids_BT=segment_ids_BT, kv_mask_BS=kv_mask_BS, window=window
        )
    if softcap is not None:  # xla only (cuDNN refuses soft-capping in its capability check)
        if causal:
            causal_mask = attention_mask(T, S, causal=True)
            mask = causal_mask if mask is None else mask & causal_mask
        return _xla_softcap(q_BTHD, k_BSKD, v_BSKD, mask, scale=scale, softcap=softcap)
    return jax.nn.dot_product_attention(
        q_BTHD, k_BSKD, v_BSKD, mask=mask, scale=scale, is_causal=causal, implementation=chosen
    )
