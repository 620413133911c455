"""`depthjax search`: find the best depth programs of a model under a budget.

    depthjax search --model DIR --budget steps=6 --out DIR
                    [--task TASK.jsonl] [--objective loss|task|TASK.jsonl]
                    [--strategy greedy|beam|evolutionary|mcts]
                    [--moves drop,drop_sublayer,repeat,swap,parallelize] [--prior gradient]
                    [--top 10] [--key 0]

Budgets: steps=N (active steps), flops=X (forward FLOPs per token at --seq-len), kv=X
(KV-cache bytes per token), latency=X (seconds, from a latency model measured on this
device), each also as a share of the start program (flops=75%), or none.

The search scores programs by next-token loss on calibration text (the embedded corpus's
train split, or --data), or with --task (--objective task, the default when a task is
given; `--objective T.jsonl` is short for `--task T.jsonl`) by the task's measure on the
task's own data (lower is better: 1 - accuracy, nats/token, ...). The top programs are
rescored by loss on held-out text (the validation split; causal models) and by the task's
measure when a task is given. Writes to --out:
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


def _objective(args) -> str:
    """ "loss" or "task" from --objective and --task (a JSONL --objective sets args.task)."""
    objective = args.objective
    if objective not in (None, "loss", "task"):
        if not objective.endswith(".jsonl"):
            raise UsageError(
                f"--objective {objective!r}: expected loss, task (with --task) or a task "
                "file T.jsonl"
            )
        if args.task and args.task != objective:
            raise UsageError(f"--objective {objective} and --task {args.task}: give one task")
        args.task, objective = objective, "task"
    objective = objective or ("task" if args.task else "loss")
    if objective == "task" and not args.task:
        raise UsageError("--objective task needs --task T.jsonl (the task to search by)")
    if objective == "task" and args.prior:
        raise UsageError(
            f"--prior {args.prior}: priors come from gate derivatives of the loss, which a "
            "task search does not compute; drop --prior or search by --objective loss"
        )
    return objective


def _task_label(task) -> str:
    """What a task's measure is (lower is better)."""
    metric = getattr(task, "metric", None)
    if metric:
        return metric if metric == "nll" else f"1 - {metric}"
    known = {"Perplexity": "nats/token", "ExactMatch": "1 - exact match"}
    return known.get(type(task).__name__, "measure")


def _search(args) -> int:
    import jax
    import yaml

    from .. import search
    from ..depth import to_spec
    from ..pruning import report

    moves = tuple(m.strip() for m in args.moves.split(",") if m.strip())
    objective = _objective(args)
    shape = (args.batch_size, args.seq_len)
    if not args.budget.startswith("latency="):
        parse_budget(args.budget, None, shape)  # bad flags fail before the model loads
    data = load_with_data(args)
    model, calib, evals, task = data.model, data.calib, data.evals, data.task
    budget = parse_budget(args.budget, model, shape)
    by = f"task {task.name}" if objective == "task" else "loss"
    print(
        f"[search] {model!r}".splitlines()[0] + f"; by {by}, {args.strategy}, "
        f"budget {args.budget}, moves {','.join(moves)}",
        flush=True,
    )
    res = search.run(
        model,
        task if objective == "task" else "loss",
        batches=None if objective == "task" else calib,
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
    found = [res.start] + top
    # columns of the table: (header, [start, rank 1, ...])
    scored_on = "task" if objective == "task" else "calibration"
    label = f"{res.objective} ({_task_label(task) if objective == 'task' else scored_on})"
    columns = [(label, [f.score for f in found])]
    held_out = task_values = None
    if model.config.causal:
        held_out = search.rescore(found, "loss", batches=evals)
        columns.append(("loss (validation)", held_out.tolist()))
    if task is not None and objective != "task":
        task_values = search.rescore(found, task)
        columns.append((f"{task.name} ({_task_label(task)})", task_values.tolist()))
    elif task is not None:
        task_values = [f.score for f in found]
    print(res.table(args.top))
    out = Path(args.out)
    (out / "specs").mkdir(parents=True, exist_ok=True)

    def cells(i: int) -> str:
        return " | ".join(f"{values[i]:.4f}" for _, values in columns)

    rows = []
    for i, f in enumerate(top, 1):
        summary = ", ".join(f"{head} {values[i]:.4f}" for head, values in columns)
        spec = to_spec(
            f.model(),
            description=f"depthjax search rank {i}: {summary}, cost {f.cost:g} {res.cost_unit}",
        )
        (out / "specs" / f"rank{i:02d}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        rows.append(f"| {i} | {cells(i)} | {f.cost:.4g} | {f.depth} | `{_cell(f.describe())}` |")
    heads = " | ".join(head for head, _ in columns)
    table = "\n".join(
        [
            f"# depthjax search: {args.model}",
            "",
            f"{res.strategy} by {res.objective}, budget {res.budget}, moves {', '.join(moves)}; "
            f"{res.evaluated} programs "
            f"scored in {res.generations} generations ({res.seconds:.1f}s).",
            "",
            f"| rank | {heads} | cost ({res.cost_unit}) "
            "| depth | program (start steps; a/m: only attn/mlp; \\|: parallel) |",
            "|---|" + "---|" * len(columns) + "---|---|---|",
            f"| start | {cells(0)} | {res.start.cost:.4g} | "
            f"{res.start.depth} | `{_cell(res.start.describe())}` |",
            *rows,
            "",
        ]
    )
    (out / "results.md").write_text(table)
    data = res.to_dict()
    if held_out is not None:
        data["validation"] = {"start": float(held_out[0]), "ranked": held_out[1:].tolist()}
    if task is not None:
        data["task"] = {
            "name": task.name,
            "measure": _task_label(task),
            "start": float(task_values[0]),
            "ranked": [float(v) for v in task_values[1:]],
        }
    report.write_json(data, out / "results.json")
    res.plot(out / "pareto.png")
    if held_out is not None:
        print(f"validation loss: start {held_out[0]:.4f}, best {held_out[1]:.4f}")
    if task is not None:
        print(
            f"task {task.name} ({_task_label(task)}): start {task_values[0]:.4f}, "
            f"best {task_values[1]:.4f}"
        )
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
    p.add_argument(
        "--objective",
        default=None,
        help="loss | task (the --task's measure) | T.jsonl (short for --task T.jsonl); "
        "default: task when --task is given, else loss",
    )
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
