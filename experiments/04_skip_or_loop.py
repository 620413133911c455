"""Experiment 4: skip a layer or loop it? Per-example search over chains of layers.

"Skip a Layer or Loop it? Test-Time Depth Adaptation of Pretrained LLMs" (Li et al.
2025) searches, per input, over chains of layers (CoLa: any sequence of a model's
layers, skips and repeats allowed) and reports that many correctly answered inputs keep
their answer with a shorter chain and many wrongly answered ones are fixed by some chain.

Task: k-hop composed permutation lookups over a small alphabet, as bytes. A query
"|kxy" says that applying the permutation k times to letter x gives y. With --task fixed
(default) one permutation holds for all data and the model must store it in its weights;
with --task context every document first lists a fresh permutation as pairs ("ac bd
...", random order), so the hops chase pointers in context. A small model is trained on
documents of several queries with depthjax.train (data=files, a generated JSONL file).
Evaluation examples are fresh documents of the same form; the prediction is the last
query's answer (the byte after its x), which the model gets wrong more often than the
first query's.

Search: `dj.search.run(..., per_example=True)`, greedy, in rounds; the neighbours of a
chain are every chain with one position skipped, one position repeated (looped once more)
or two adjacent positions swapped. For an example the model gets right the search keeps
it right while shortening the chain (skips only); for one it gets wrong it climbs the
log-probability of the right answer, and the example counts as fixed when the chain it
ends on answers right. Every (chain, example) pair of a round runs through one compiled,
vmapped forward (chains padded to one length with gated-off steps). Control: the same
search aimed at a random wrong letter shows how often a search over many chains reaches a
target by chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import common
import depthjax as dj
from depthjax.pruning.report import pyplot


# -- the task ------------------------------------------------------------------------------
def make_example(rng, n_letters: int, max_hops: int, n_queries: int, perm=None) -> tuple[str, list]:
    """Queries "|kxy" (y = perm^k(x)) as text, and [(x, k, y)].

    perm=None (task "context"): a fresh random permutation, written first as pairs in
    random order ("ac bd ..."), so every lookup is in context. Otherwise (task "fixed")
    the given permutation, which the model has to hold in its weights."""
    letters = [chr(ord("a") + i) for i in range(n_letters)]
    text = ""
    if perm is None:
        perm = rng.permutation(n_letters)
        text = " ".join(letters[i] + letters[perm[i]] for i in rng.permutation(n_letters))
    queries = []
    for _ in range(n_queries):
        x, k = int(rng.integers(n_letters)), int(rng.integers(1, max_hops + 1))
        y = x
        for _ in range(k):
            y = perm[y]
        queries.append((letters[x], k, letters[y]))
        text += f"|{k}{letters[x]}{letters[y]}"  # y right after x: an induction-style lookup
    return text, queries


def task_permutation(args):
    """The fixed permutation of task "fixed" (None for "context")."""
    return (
        np.random.default_rng(args.seed + 77).permutation(args.letters)
        if args.task == "fixed"
        else None
    )


def write_train_file(path: Path, n_docs: int, args) -> None:
    rng = np.random.default_rng(args.seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            text, _ = make_example(
                rng, args.letters, args.max_hops, args.queries, task_permutation(args)
            )
            f.write(json.dumps({"text": text}) + "\n")


def eval_set(args):
    """Fresh documents of --queries queries cut before the last answer: tokens int32
    [N, T] (ending at the last query's start letter), answers [N] (byte), hops [N]."""
    rng = np.random.default_rng(10_000 + args.seed)
    toks, ans, hops = [], [], []
    for _ in range(args.examples):
        text, q = make_example(
            rng, args.letters, args.max_hops, args.queries, task_permutation(args)
        )
        toks.append(np.frombuffer(text[:-1].encode(), np.uint8))
        ans.append(ord(q[-1][2]))
        hops.append(q[-1][1])
    return np.stack(toks).astype(np.int32), np.asarray(ans), np.asarray(hops)


# -- search (dj.search, per example) ---------------------------------------------------------
def answer_logprob(logits_BTV, batch):
    """Objective: log-probability of each row's target byte after its prompt (maximize),
    and whether it is the model's top prediction ("right")."""
    lp_BV = jax.nn.log_softmax(logits_BTV[:, -1].astype(jnp.float32))
    target = batch["target"]
    return {
        "score": jnp.take_along_axis(lp_BV, target[:, None], -1)[:, 0],
        "right": (jnp.argmax(lp_BV, -1) == target).astype(jnp.float32),
    }


def answer_right(logits_BTV, batch):
    """Objective: 1 where the top prediction is the target (maximize; ties go to the
    shorter chain, so a search on it shortens chains that stay right)."""
    return (jnp.argmax(logits_BTV[:, -1], -1) == batch["target"]).astype(jnp.float32)


def search(model, tokens, targets, *, shorten: bool, rounds: int, max_len: int):
    """Greedy per-example chain search (dj.search.run(per_example=True)): every round's
    (chain, example) pairs of all examples go through one compiled forward.

    shorten=True (examples the full chain gets right): skips only, each keeping the answer
    right, so the result is the shortest right chain the search reaches. shorten=False:
    skip, loop (repeat) or swap moves that raise the target's log-probability."""
    rows = [{"tokens": tokens, "target": np.asarray(targets, np.int32)}]
    objective = (
        dj.search.logits(answer_right, rows, maximize=True, name="right")
        if shorten
        else dj.search.logits(answer_logprob, rows, maximize=True, name="log p(target)")
    )
    moves = ("drop",) if shorten else ("drop", "repeat", "swap")
    return dj.search.run(
        model,
        objective,
        per_example=True,
        moves=moves,
        max_depth=max_len,
        strategy=dj.search.Greedy(rounds=rounds),
    )


def plot(path, lengths, rows, depth: int) -> None:
    """Left: shortest chain that keeps a right answer; right: share of wrong examples the
    search fixes vs the share it pushes to a random wrong letter, by hop count."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(np.arange(1, len(lengths)), lengths[1:])
    a.axvline(depth, color="gray", ls=":", label=f"model depth {depth}")
    a.set_xlabel("shortest chain found (steps)")
    a.set_ylabel("right examples")
    a.legend(fontsize=7)
    frac = lambda t: (lambda n, d: n / d if d else np.nan)(*map(int, t.split("/")))
    hops = np.array([r[0] for r in rows], float)
    b.bar(hops - 0.2, [frac(r[5]) for r in rows], 0.4, label="fixed (true answer)")
    b.bar(hops + 0.2, [frac(r[6]) for r in rows], 0.4, label="control (random wrong letter)")
    b.set_xlabel("hops")
    b.set_ylabel("share of wrong examples")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = common.parser(
        "04_skip_or_loop", __doc__, layers=6, steps=200, batch_size=32, seq_len=64, lr=2e-3
    )
    p.add_argument(
        "--task",
        choices=("fixed", "context"),
        default="fixed",
        help="fixed: one permutation held in the weights; context: a fresh "
        "permutation per example, listed before the query",
    )
    p.add_argument(
        "--letters",
        type=int,
        default=None,
        help="alphabet size of the permutation (default 26 fixed, 6 context)",
    )
    p.add_argument("--max-hops", type=int, default=None, help="default 6 fixed, 3 context")
    p.add_argument("--queries", type=int, default=8, help="queries per training document")
    p.add_argument("--train-docs", type=int, default=50_000)
    p.add_argument("--examples", type=int, default=300, help="evaluation examples")
    p.add_argument("--rounds", type=int, default=8, help="greedy search rounds")
    p.add_argument(
        "--extra-steps",
        type=int,
        default=2,
        help="chains may be this many steps longer than the model",
    )
    args = common.parse(p, argv, __file__)
    args.letters = args.letters or (26 if args.task == "fixed" else 6)
    args.max_hops = args.max_hops or (6 if args.task == "fixed" else 3)
    if not 2 <= args.letters <= 26 or args.max_hops > 9:
        raise SystemExit("--letters must be in 2..26 and --max-hops in 1..9")
    out = common.out_dir(args)
    data_dir = Path(args.cache) / "hops_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_file = data_dir / (
        f"hops-{args.task}-l{args.letters}-h{args.max_hops}-q{args.queries}-"
        f"n{args.train_docs}-s{args.seed}.jsonl"
    )
    if not train_file.exists():
        common.log(f"writing {args.train_docs:,} training documents to {train_file}")
        write_train_file(train_file, args.train_docs, args)
    tc = common.train_config(args, data="files", data_files=[str(train_file)])
    model = common.trained(args, "hops", tc)

    tokens, answers, hops = eval_set(args)
    S = model.depth
    max_len = S + args.extra_steps
    logits = jax.jit(dj.apply)(model, tokens)[:, -1]
    pred0 = np.asarray(logits.argmax(-1))
    right0 = pred0 == answers
    wrong = ~right0
    common.log(f"search: {len(tokens)} examples, chains up to {max_len} steps")
    shortest = np.zeros(len(tokens), int)
    final = [tuple(range(S))] * len(tokens)
    fixed_or_kept = right0.copy()
    if right0.any():
        kept = search(
            model,
            tokens[right0],
            answers[right0],
            shorten=True,
            rounds=args.rounds,
            max_len=max_len,
        )
        common.log(f"  right examples: {kept}")
        shortest[right0] = [f.depth for f in kept.best]
        for e, f in zip(np.flatnonzero(right0), kept.best):
            final[e] = f.candidate.steps
    if wrong.any():
        climbed = search(
            model, tokens[wrong], answers[wrong], shorten=False, rounds=args.rounds, max_len=max_len
        )
        common.log(f"  wrong examples: {climbed}")
        fixed_or_kept[wrong] = [f.measures["right"] == 1 for f in climbed.best]
        for e, f in zip(np.flatnonzero(wrong), climbed.best):
            final[e] = f.candidate.steps
    # Control: aim the same search at a random letter that is neither the answer nor the
    # model's prediction; a "fix" rate near this one would be luck, not structure.
    rng = np.random.default_rng(args.seed)
    letters = ord("a") + np.arange(args.letters)
    decoys = np.array(
        [rng.choice([c for c in letters if c not in (a, p_)]) for a, p_ in zip(answers, pred0)]
    )
    decoy_hit = np.zeros(0, bool)
    if wrong.any():
        common.log("control search toward random wrong letters")
        control = search(
            model, tokens[wrong], decoys[wrong], shorten=False, rounds=args.rounds, max_len=max_len
        )
        decoy_hit = np.array([f.measures["right"] == 1 for f in control.best])

    kept_shorter = right0 & (shortest < S) & (shortest > 0)
    fixed = wrong & fixed_or_kept
    rows = []
    for k in list(range(1, args.max_hops + 1)) + ["all"]:
        sel = np.ones(len(hops), bool) if k == "all" else hops == k
        r, w = sel & right0, sel & wrong
        dsel = (hops[wrong] == k) if k != "all" else np.ones(wrong.sum(), bool)
        rows.append(
            [
                k,
                int(sel.sum()),
                f"{r.sum() / max(sel.sum(), 1):.1%}",
                f"{(kept_shorter & sel).sum()}/{r.sum()}",
                f"{shortest[r].mean():.2f}" if r.any() else "-",
                f"{(fixed & sel).sum()}/{w.sum()}",
                f"{decoy_hit[dsel].sum()}/{dsel.sum()}",
            ]
        )
    lengths = np.bincount(shortest[right0], minlength=max_len + 1)
    plot(out / "search.png", lengths, rows[:-1], S)
    sections = [
        f"Model: {S} steps, d_model={model.config.d_model}, trained {args.steps} steps on "
        f"task '{args.task}', {args.letters}-letter permutations with 1..{args.max_hops} "
        f"hops, {args.queries} queries per document. Search: "
        f"{args.rounds} greedy rounds, chains up to {max_len} steps.",
        "## Per hop count\n\n"
        + common.md_table(
            [
                "hops",
                "examples",
                "accuracy (full chain)",
                "right, kept by a shorter chain",
                "mean shortest right chain",
                "wrong, fixed by the search's chain",
                "control: wrong, pushed to a random wrong letter",
            ],
            rows,
        ),
        "## Shortest chain found that keeps a right answer\n\n"
        + common.md_table(
            ["steps"] + list(range(1, max_len + 1)), [["examples"] + lengths[1:].tolist()]
        ),
        "## Example chains found (example: hops, chain)\n\n"
        + "\n".join(
            f"* {i}: {hops[i]} hops, {'right' if right0[i] else 'wrong'} -> "
            f"{'right' if fixed_or_kept[i] else 'wrong'} with chain {list(final[i])}"
            for i in range(min(8, len(tokens)))
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 4: skip or loop (chain-of-layers search)",
        sections,
        {
            "right0": right0,
            "hit": fixed_or_kept,
            "shortest": shortest,
            "hops": hops,
            "decoy_hit": decoy_hit,
            "final_chains": [list(c) for c in final],
        },
    )


if __name__ == "__main__":
    main()
