"""Will a training run fit? A lower-bound estimate of one device's memory from the config,
checked before anything is compiled or written, so that `batch_size=1000000` is refused in
a second instead of swapping for minutes.

The estimate counts what cannot be avoided: parameters, gradients and Adam's two moments
(float32, split over the fsdp and tensor axes), the residual stream and the sublayer
inputs saved for the backward pass, and the logits with their gradient, all times the
number of seeds trained in the one program (`seeds`: a vmap holds every seed's state and
activations at once). Attention scores, XLA's temporaries and fragmentation come on top,
so a run refused here could never fit. Where several seeds do not fit, train fewer per
program: the caller loops over runs (experiments/common.py does).
"""

from __future__ import annotations

import os

import jax

from ..core.config import ModelConfig
from .config import TrainConfigError

FLOAT32 = 4


class DoesNotFit(TrainConfigError):
    """The run's memory estimate exceeds one device's memory."""


def estimate(cfg: ModelConfig, tc, *, depth: int, n_params: int, n_trainable: int, mesh) -> dict:
    """{"params", "activations", "total"} in bytes on one device, for all `tc.seeds`."""
    shape = dict(mesh.shape)
    model_split = shape.get("fsdp", 1) * shape.get("tensor", 1)
    rows = tc.batch_size // tc.grad_accum / max(shape.get("data", 1) * shape.get("fsdp", 1), 1)
    tokens = rows * tc.seq_len
    act_bytes = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    # per step: the residual and the two sublayer inputs (normalized) and outputs
    activations = tokens * depth * cfg.d_model * 5 * act_bytes
    logits = tokens * cfg.vocab_size / shape.get("tensor", 1) * FLOAT32 * 2
    weights = (n_params + 3 * n_trainable) * FLOAT32 / model_split * tc.seeds
    activations = (activations + logits) * tc.seeds
    return {"params": weights, "activations": activations, "total": weights + activations}


def device_memory() -> tuple[int | None, str]:
    """(bytes one device may use, where that number comes from)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend reports
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    return host // jax.local_device_count(), (
        f"host memory / {jax.local_device_count()} local device(s)"
    )


def check_fits(cfg: ModelConfig, tc, **kw) -> None:
    """Raise DoesNotFit (a TrainConfigError) when the estimate exceeds the device's memory."""
    need = estimate(cfg, tc, **kw)
    have, source = device_memory()
    if have is None or need["total"] <= have:
        return
    gib = 2**30
    seeds = f" and {tc.seeds} seeds in one program" if tc.seeds > 1 else ""
    fewer = "train fewer seeds per program (seeds=1 runs, one per seed), " if tc.seeds > 1 else ""
    raise DoesNotFit(
        f"this run needs at least {need['total'] / gib:.1f} GiB per device "
        f"({need['params'] / gib:.1f} GiB parameters, gradients and Adam moments, "
        f"{need['activations'] / gib:.1f} GiB activations and logits for "
        f"batch_size={tc.batch_size}, seq_len={tc.seq_len}, grad_accum={tc.grad_accum}{seeds}) "
        f"but a device has {have / gib:.1f} GiB ({source}); {fewer}lower batch_size or "
        "seq_len, raise grad_accum, or add devices"
    )
