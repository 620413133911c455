"""What checksumming every file of a checkpoint costs.

Native checkpoints: dj.load with verification (SHA-256 of every file) against
dj.load(verify=False), and dj.save (which digests what it wrote). Training checkpoints:
depthjax's seal (hash every file orbax wrote) and verify against orbax's own save and
restore of the same train-state-sized tree (params + two Adam moments).

    python benchmarks/integrity.py [--depth 8] [--d-model 512]
"""

import shutil
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

import depthjax as dj
from common import model_from_args
from depthjax.files import integrity


def clock(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    args, model, _ = model_from_args(__doc__, depth=8, d_model=512, batch=1, seq_len=1)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    tmp = Path(tempfile.mkdtemp())
    try:
        ck = tmp / "ck"
        save = clock(lambda: dj.save(model, ck))
        plain = clock(lambda: jax.block_until_ready(dj.load(ck, verify=False).params))
        verified = clock(lambda: jax.block_until_ready(dj.load(ck).params))
        print(f"native checkpoint, {nbytes / 2**20:.0f} MiB of parameters")
        print(f"  dj.save (writes + digests every file)   {save:.3f}s")
        print(f"  dj.load(verify=False)                   {plain:.3f}s")
        print(
            f"  dj.load (SHA-256 of every file)         {verified:.3f}s   "
            f"= {verified / plain:.2f}x unverified"
        )

        state = {"params": model.params, "mu": model.params, "nu": model.params}
        orbax_dir = tmp / "orbax"

        def orbax_save():
            shutil.rmtree(orbax_dir, ignore_errors=True)
            with ocp.StandardCheckpointer() as c:
                c.save(orbax_dir / "step", state)

        t_save = clock(orbax_save)
        step = orbax_dir / "step"
        t_seal = clock(lambda: integrity.seal(step))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

        def orbax_restore():
            with ocp.StandardCheckpointer() as c:
                jax.block_until_ready(c.restore(step, abstract))

        t_restore = clock(orbax_restore)
        t_verify = clock(lambda: integrity.verify(step))
        size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
        print(f"training checkpoint (orbax, params + 2 moments), {size / 2**20:.0f} MiB on disk")
        print(
            f"  orbax save          {t_save:.3f}s    seal   {t_seal:.3f}s = "
            f"{t_seal / t_save:.2f}x the save"
        )
        print(
            f"  orbax restore       {t_restore:.3f}s    verify {t_verify:.3f}s = "
            f"{t_verify / t_restore:.2f}x the restore"
        )
        print(
            f"  hashing throughput  {size / 2**20 / t_verify:.0f} MiB/s (one process; a "
            "multi-host restore splits the files over the processes)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
