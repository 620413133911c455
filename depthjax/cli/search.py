"""`depthjax search`: find the best depth programs of a model under a budget.

    depthjax search --model DIR --budget steps=6 --out DIR
                    [--objective loss] [--strategy greedy|beam|evolutionary|mcts]
                    [--moves drop,drop_sublayer,repeat,swap,parallelize] [--prior gradient]
                    [--top 10] [--key 0]

Budgets: steps=N (active steps), flops=X (forward FLOPs per token at --seq-len), kv=X
(KV-cache bytes per token), latency=X (seconds, from a latency model measured on this
device), each also as a share of the start program (flops=75%), or none.

The search scores programs on calibration text (the embedded corpus's train split); the
top programs are rescored on held-out text (its validation split). Writes to --out:
specs/rank01.yaml ... (slice specs: `depthjax depth --in MODEL --spec FILE`), results.md
(table), results.json and pareto.png (score vs cost of every program scored).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, add_data_args, add_quiet_arg, load_with_data

BUDGETS = ("steps", "flops", "kv", "latency")
# depthjax.search.MOVES, spelled out so that `depthjax --help` does not import JAX (a test
# keeps the two equal)
MOVES = ("drop", "drop_sublayer", "repeat", "swap", "parallelize")


def parse_budget(text: str, model=None, batch_shape=None):
    """A search.Budget from "steps=6", "flops=75%", "kv=4096", "latency=80%" or "none"."""
    from .. import search

    if text == "none":
        return None
    name, sep, value = text.partition("=")
    if not sep or name not in BUDGETS or not value:
        forms = ", ".join(b + "=X" for b in BUDGETS)
        raise UsageError(
            f"--budget {text!r}: expected one of {forms} "
            "(X a number or a percentage of the start program) or none"
        )
    try:
        number = float(value.rstrip("%"))
    except ValueError:
        raise UsageError(f"--budget {text!r}: {value!r} is not a number or percentage") from None
    amount = (
        {"fraction": number / 100}
        if value.endswith("%")
        else {"limit": int(number) if name == "steps" and number.is_integer() else number}
    )
    if name == "steps":
        if "limit" in amount and not isinstance(amount["limit"], int):
            raise UsageError(f"--budget {text!r}: a steps budget is a whole number")
        return search.Budget.steps(**amount)
    if name == "flops":
        return search.Budget.flops(**amount, seq_len=batch_shape[1])
    if name == "kv":
        return search.Budget.kv_bytes(**amount)
    return search.Budget.latency(search.LatencyModel.measure(model, batch_shape), **amount)


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a `|` would end the cell)."""
    return text.replace("|", "\\|")


def _search(args) -> int:
    import jax
    import yaml

    from .. import report, search
    from ..depth import to_spec

    moves = tuple(m.strip() for m in args.moves.split(",") if m.strip())
    if args.objective != "loss":
        raise UsageError(
            f"--objective {args.objective!r}: only 'loss' is available "
            "(task objectives come with depthjax.eval)"
        )
    shape = (args.batch_size, args.seq_len)
    if not args.budget.startswith("latency="):
        parse_budget(args.budget, None, shape)  # bad flags fail before the model loads
    data = load_with_data(args)
    model, calib, evals = data.model, data.calib, data.evals
    budget = parse_budget(args.budget, model, shape)
    print(
        f"[search] {model!r}".splitlines()[0] + f"; {args.strategy}, budget {args.budget}, "
        f"moves {','.join(moves)}",
        flush=True,
    )
    res = search.run(
        model,
        "loss",
        batches=calib,
        budget=budget,
        strategy=args.strategy,
        moves=moves,
        prior=args.prior,
        key=jax.random.key(args.key),
    )
    top = res.ranked[: args.top]
    if not top:
        raise UsageError(
            f"no program scored fits the budget {res.budget}; loosen --budget or "
            "allow moves that lower the cost (drop, drop_sublayer)"
        )
    held_out = search.rescore([res.start] + top, "loss", batches=evals)
    print(res.table(args.top))
    out = Path(args.out)
    (out / "specs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (f, valid) in enumerate(zip(top, held_out[1:]), 1):
        spec = to_spec(
            f.model(),
            description=f"depthjax search rank {i}: {res.objective} "
            f"{f.score:.4f} (calibration), {valid:.4f} "
            f"(validation), cost {f.cost:g} {res.cost_unit}",
        )
        (out / "specs" / f"rank{i:02d}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        rows.append(
            f"| {i} | {f.score:.4f} | {valid:.4f} | {f.cost:.4g} | {f.depth} "
            f"| `{_cell(f.describe())}` |"
        )
    table = "\n".join(
        [
            f"# depthjax search: {args.model}",
            "",
            f"{res.strategy}, budget {res.budget}, moves {', '.join(moves)}; "
            f"{res.evaluated} programs "
            f"scored in {res.generations} generations ({res.seconds:.1f}s).",
            "",
            f"| rank | {res.objective} (calibration) | {res.objective} (validation) "
            f"| cost ({res.cost_unit}) "
            "| depth | program (start steps; a/m: only attn/mlp; \\|: parallel) |",
            "|---|---|---|---|---|---|",
            f"| start | {res.start.score:.4f} | {held_out[0]:.4f} | {res.start.cost:.4g} | "
            f"{res.start.depth} | `{_cell(res.start.describe())}` |",
            *rows,
            "",
        ]
    )
    (out / "results.md").write_text(table)
    data = res.to_dict()
    data["validation"] = {"start": float(held_out[0]), "ranked": held_out[1:].tolist()}
    report.write_json(data, out / "results.json")
    res.plot(out / "pareto.png")
    print(f"validation loss: start {held_out[0]:.4f}, best {held_out[1]:.4f}")
    print(f"wrote {out}/results.md, results.json, pareto.png and {len(top)} specs in {out}/specs")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search the best depth programs under a budget; specs, table, Pareto plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(p)
    p.add_argument(
        "--budget",
        default="none",
        help="steps=N | flops=X | kv=X | latency=X "
        "(X absolute or a percentage of the start, e.g. flops=75%%) | none",
    )
    p.add_argument("--objective", default="loss", help="what to minimize (default: loss)")
    p.add_argument(
        "--strategy", default="greedy", choices=["greedy", "beam", "evolutionary", "mcts"]
    )
    p.add_argument(
        "--moves", default=",".join(MOVES), help="comma-separated subset of " + ", ".join(MOVES)
    )
    p.add_argument(
        "--prior",
        choices=["gradient", "hessian"],
        default=None,
        help="order candidates by a Taylor estimate from the gate gradient (and Hessian)",
    )
    p.add_argument("--top", type=int, default=10, help="programs to write as specs")
    p.add_argument("--key", type=int, default=0, help="random seed of the search")
    p.add_argument("--out", required=True, help="output directory")
    add_quiet_arg(p)
    p.set_defaults(func=_search)
