"""The research loop on 8 fake CPU devices (run by tests/test_sharded_analysis.py in a
subprocess, since the device count is fixed when jax starts): every step on a model loaded
with `dj.hf.load(dir, mesh=)` against the same step on the model on one device.

Prints one JSON line: the per-device parameter bytes and every step's largest difference.
"""

import importlib.util
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import depthjax as dj
from depthjax.core import sharding as shd

jax.config.update("jax_default_matmul_precision", "highest")

EXAMPLES = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " é"], "label": 0},
    {"context": "import os\nimport ", "choices": ["sys", "résumé", "re"], "label": 2},
]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def per_device_bytes(params) -> dict:
    """Bytes each device holds, and those of the replicated (unsharded) leaves."""
    held: dict = {}
    replicated = total = 0
    for x in jax.tree.leaves(params):
        total += x.nbytes
        if x.sharding.is_fully_replicated:
            replicated += x.nbytes
        for s in x.addressable_shards:
            held[s.device.id] = held.get(s.device.id, 0) + s.data.nbytes
    return {"total": total, "replicated": replicated, "max_device": max(held.values())}


def steps(model, calib, tokens_BT):
    """Every step of the research loop: ({name: outputs as host numpy}, {name: a model the
    step made, whose parameters must stay sharded like the input's})."""
    M = dj.metrics
    out, made = {}, {}
    out["block_influence"] = M.block_influence(model, calib)
    out["relative_contribution"] = M.relative_contribution(model, calib)
    out["ablation"] = M.ablation(model, calib, unit="block")
    out["shapley"] = M.shapley(model, calib, unit="attn", num_permutations=2, key=jax.random.key(1))
    out["gate_gradient"] = M.gate_gradient(model, calib)
    made["prune"] = dj.prune(model, out["block_influence"], 1, unit="block")
    out["prune"] = dj.apply(made["prune"], tokens_BT)
    for method, rank in (("bias", None), ("linear", 4), ("lora", 2), ("distill", 2)):
        extra = dict(lora_steps=3, learning_rate=1e-2) if rank == 2 else {}
        made[method] = dj.recover(made["prune"], model, calib, method=method, rank=rank, **extra)
        out[f"recover_{method}"] = dj.apply(made[method], tokens_BT)
    out["perplexity"] = dj.eval.perplexity(model, ["hello sharded world " * 3])["nll"]
    out["multiple_choice"] = dj.eval.multiple_choice(model, EXAMPLES)["loglikelihoods"]
    found = dj.search.run(model, "loss", batches=calib, budget=3, key=jax.random.key(2))
    out["search"] = [(np.asarray(f.program.block), f.score) for f in found.ranked[:3]]
    made["search"] = found.best.model()
    out["generate"] = dj.generate(model, tokens_BT[:, :6], 5, temperature=0.0).tokens
    return out, made


def harness(directory: str, **mesh) -> list:
    """The lm-eval adapter's log-likelihoods of two requests (lm_eval installed only)."""
    from depthjax.eval.harness import DepthjaxLM

    lm = DepthjaxLM(path=directory, **mesh)
    return lm._loglikelihood_tokens([(None, [10, 20, 30], [40, 50]), (None, [7], [8, 9, 10])])


def gguf_tensors(path: str) -> dict:
    """Every tensor of a GGUF file, by name (read with the gguf library)."""
    from gguf import GGUFReader

    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def error(a, b, rtol=1e-5, atol=1e-5) -> float:
    """max |a - b| / (atol + rtol |a|) over every leaf: <= 1 is equal to float tolerance."""
    return max(
        float(np.max(np.abs(x.astype(np.float64) - y) / (atol + rtol * np.abs(x)), initial=0))
        for x, y in zip(_leaves(a), _leaves(b), strict=True)
    )


def main(directory: str) -> None:
    cfg = dj.configs.get("llama-tiny", max_seq_len=64)
    dj.hf.save(dj.init(cfg, jax.random.key(0)), directory)
    mesh = shd.make_mesh(data=1, fsdp=4, tensor=2)
    t0 = time.time()
    single = dj.hf.load(directory)
    sharded = dj.hf.load(directory, mesh=mesh)
    spec = lambda m: [x.sharding.spec for x in jax.tree.leaves(m.params)]
    report = {"bytes": per_device_bytes(sharded.params), "error": {}, "max_device": {}}
    report["error"]["hf.load"] = error(single.params, sharded.params)
    report["same_as_dj.shard"] = spec(dj.shard(single, mesh)) == spec(sharded)
    # the compiled forward's per-device scratch memory: a gathered table would add the
    # whole model's weights to it
    forward = jax.jit(dj.apply).lower(sharded, jnp.zeros((4, 16), jnp.int32)).compile()
    report["forward_temp"] = forward.memory_analysis().temp_size_in_bytes
    rng = np.random.default_rng(0)
    calib = [jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 16)), jnp.int32) for _ in range(2)]
    (want, _), (got, made) = steps(single, calib, calib[0]), steps(sharded, calib, calib[0])
    for name in want:
        report["error"][name] = error(want[name], got[name])
    for name, m in made.items():  # the blocks' bytes per device, over their total
        b = per_device_bytes(m.params["blocks"])
        report["max_device"][name] = b["max_device"] / b["total"]
    # export of the sharded model: the same tensors as that of the single-device one
    dj.hf.save(sharded, directory + "-hf")
    report["error"]["export"] = error(single.params, dj.hf.load(directory + "-hf").params)
    dj.save(sharded, directory + "-native")
    native = dj.load(directory + "-native", mesh=mesh)
    report["error"]["dj.load"] = error(single.params, native.params)
    report["dj.load_sharded"] = spec(native) == spec(sharded)
    gguf = [
        dj.gguf.save(m, f"{directory}-{name}.gguf") for name, m in (("1", single), ("8", sharded))
    ]
    report["error"]["gguf"] = error(*(gguf_tensors(f"{directory}-{n}.gguf") for n in "18"))
    report["gguf_same_header"] = gguf[0] == gguf[1]
    # a vocabulary the tensor axis does not divide: replicated there, and said so
    odd = dj.init(cfg.replace(vocab_size=cfg.vocab_size + 1), jax.random.key(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        placed = dj.shard(odd, mesh)
    report["unsharded_warning"] = [str(w.message) for w in caught]
    report["odd_vocab_spec"] = str(placed.params["head"]["out"]["kernel"].sharding.spec)
    if importlib.util.find_spec("lm_eval") is not None:
        report["error"]["harness"] = error(harness(directory), harness(directory, fsdp=4, tensor=2))
    report["seconds"] = time.time() - t0
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
