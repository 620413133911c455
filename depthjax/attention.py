"""The one attention entry point. Models call `attend`; `impl` picks the implementation.

Masks are described, not materialized, by the caller (causal flag, segment ids for packed
documents, key padding), so that fused kernels can use them without a T x S mask.

Implementations (``ModelConfig.attention_impl``):

* ``"xla"``    `jax.nn.dot_product_attention(implementation="xla")`, runs everywhere;
* ``"cudnn"``  cuDNN flash attention through the same JAX function (GPU, bf16/fp16);
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

from .config import ATTENTION_IMPLS as IMPLS

log = logging.getLogger(__name__)


class AttentionUnavailable(ValueError):
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
    T: int, S: int, *, causal: bool, segment_ids_BT=None, kv_mask_BS=None, q_offset=0
):
    """Boolean mask [B or 1, 1, T, S]: True where query t may attend to key s.

    `q_offset` is the absolute position of query 0 among the keys (decoding with a cache).
    kv_mask_BS may also be [B, T, S]: a key mask per query (decoding with a cache).
    """
    mask = jnp.ones((1, 1, T, S), bool)
    if causal:
        q_pos = jnp.arange(T)[:, None] + q_offset
        mask = mask & (jnp.arange(S)[None, :] <= q_pos)[None, None]
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

    @classmethod
    def of(cls, q, k, *, causal, segment_ids_BT, kv_mask_BS) -> Problem:
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
        if candidate == "cudnn" and not reason and (problem.segments or problem.kv_mask):
            reason = "cuDNN would need a dense T x S mask for segment ids / key padding"
        if not reason:
            return candidate
        # An accelerator ending on xla is a real performance surprise; say it loudly.
        level = logging.WARNING if problem.backend != "cpu" else logging.INFO
        _log_once(level, f"attention auto: skipping {candidate}: {reason}")
    return "xla"


# -------------------------------------------------------------------------- execution
def _pallas(q, k, v, *, causal, segment_ids_BT, kv_mask_BS, scale, backend, interpret):
    from depthjax.kernels.flash_attention import KV_PAD_SEGMENT, flash_attention
    from depthjax.kernels.splash import splash_attention

    kv_seg = None
    if kv_mask_BS is not None:  # key padding = keys in a segment no query belongs to
        seg = (
            segment_ids_BT if segment_ids_BT is not None else jnp.zeros(kv_mask_BS.shape, jnp.int32)
        )
        kv_seg = jnp.where(kv_mask_BS.astype(bool), seg.astype(jnp.int32), KV_PAD_SEGMENT)
        segment_ids_BT = seg
    fn = splash_attention if backend == "tpu" else flash_attention
    return fn(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids_BT,
        kv_segment_ids=kv_seg,
        scale=scale,
        interpret=interpret,
    )


def _context_mesh():
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    return mesh if mesh is not None and not mesh.empty and mesh.size > 1 else None


def _sharded(fn, mesh, q, k, v, segment_ids_BT, kv_mask_BS):
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
    args = (q, k, v, segment_ids_BT, kv_mask_BS)
    specs = (
        qkv,
        qkv,
        qkv,
        None if segment_ids_BT is None else seg,
        None if kv_mask_BS is None else seg,
    )
    # check_vma=False: pallas_call outputs carry no varying-manual-axes annotation.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def attend(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    *,
    causal: bool,
    segment_ids_BT=None,
    kv_mask_BS=None,
    scale: float | None = None,
    impl: str = "xla",
):
    """Softmax attention; H must be a multiple of K (grouped-query). Returns [B, T, H, D].

    Query rows that can see no key: xla/cudnn average V uniformly, pallas returns zeros.
    A per-query key mask kv_mask_BS [B, T, S] (decoding from a cache) runs on xla only.
    """
    if kv_mask_BS is not None and kv_mask_BS.ndim == 3:
        if impl not in ("xla", "auto"):
            raise AttentionUnavailable(
                f"attention_impl={impl!r} cannot run: a per-query key mask [B, T, S] needs xla"
            )
        impl = "xla"
    problem = Problem.of(
        q_BTHD, k_BSKD, causal=causal, segment_ids_BT=segment_ids_BT, kv_mask_BS=kv_mask_BS
    )
    chosen = choose(impl, problem)
    if chosen == "pallas":

        def run(q, k, v, seg, kv_mask):
            return _pallas(
                q,
                k,
                v,
                causal=causal,
                segment_ids_BT=seg,
                kv_mask_BS=kv_mask,
                scale=scale,
                backend=problem.backend,
                interpret=problem.backend == "cpu",
            )

        mesh = _context_mesh()
        if mesh is None:
            return run(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, kv_mask_BS)
        return _sharded(run, mesh, q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, kv_mask_BS)
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    mask = None
    if segment_ids_BT is not None or kv_mask_BS is not None:
        mask = attention_mask(
            T, S, causal=False, segment_ids_BT=segment_ids_BT, kv_mask_BS=kv_mask_BS
        )
    return jax.nn.dot_product_attention(
        q_BTHD, k_BSKD, v_BSKD, mask=mask, scale=scale, is_causal=causal, implementation=chosen
    )
