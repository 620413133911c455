"""`depthjax eval`: task-level evaluation of a checkpoint, or of a program on its table.

    depthjax eval --model DIR [--program SPEC.yaml] --task TASK.jsonl [--task ...]
                  [--data FILES|tfds:NAME[:SPLIT]] [--out RESULTS.json]

A task file is JSONL: {"context", "choices", "label"} lines are multiple choice (acc,
acc_norm, acc_bytes), {"context", "target"} lines greedy exact match (--stop,
--max-new-tokens), {"text"} lines rolling perplexity; --data gives rolling perplexity
(nats/token, bits/byte) of text/JSONL files or a TFDS dataset. For lm-evaluation-harness
tasks use `lm_eval --model depthjax --model_args path=DIR[,program=SPEC.yaml] --tasks T`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import UsageError, add_load_args, read_model


def _eval(args) -> int:
    from .. import eval as E
    from ..pruning.report import to_json

    if not args.task and not args.data:
        raise UsageError("give at least one --task FILE.jsonl or --data FILES")
    md = read_model(args.model, args.tokenizer, args.program, args.param_dtype, args.mesh)
    model, tok = md.model, md.tokenizer
    print(f"[eval] {repr(model).splitlines()[0]}", flush=True)
    results = {}
    for path in args.task or []:
        task = E.load_task(path, tokenizer=tok)
        if isinstance(task, E.ExactMatch):
            task.stop, task.max_new_tokens = tuple(args.stop or ["\n"]), args.max_new_tokens
        if isinstance(task, (E.MultipleChoice, E.Perplexity)):
            task.batch_size = args.batch_size
        if isinstance(task, E.Perplexity):
            task.prefix_token, task.max_len = args.prefix_token, args.max_len
        if isinstance(task, E.MultipleChoice):
            task.max_len = args.max_len
        t0 = time.perf_counter()
        results[task.name] = task.evaluate(model)
        results[task.name]["seconds"] = time.perf_counter() - t0
    if args.data:
        t0 = time.perf_counter()
        results["perplexity"] = E.perplexity(
            model,
            args.data,
            tokenizer=tok,
            max_len=args.max_len,
            prefix_token=args.prefix_token,
            batch_size=args.batch_size,
            text_key=args.text_key,
        )
        results["perplexity"]["seconds"] = time.perf_counter() - t0
    for name, res in results.items():
        shown = {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "seconds"}
        print(
            f"{name:<24} "
            + "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            )
            + f"  ({res['seconds']:.1f}s)"
        )
    if args.out:
        keep = {
            name: {k: v for k, v in res.items() if k not in ("loglikelihoods", "is_greedy")}
            for name, res in results.items()
        }
        Path(args.out).write_text(json.dumps(to_json(keep), indent=1))
        print(f"wrote {args.out}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="task accuracy, exact match and perplexity of a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="native checkpoint or Hugging Face directory")
    add_load_args(p)
    p.add_argument(
        "--program", default=None, help="slice spec (YAML/JSON) run on the model's table"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json (default: the model directory's, else byte)",
    )
    p.add_argument("--task", action="append", help="task JSONL file (repeatable)")
    p.add_argument(
        "--data",
        default=None,
        help="rolling perplexity of .txt/.jsonl files, a glob or directory, or tfds:NAME[:SPLIT]",
    )
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="scoring window in tokens (default: the model's max_seq_len)",
    )
    p.add_argument(
        "--prefix-token",
        type=int,
        default=None,
        help="perplexity: token that conditions each document's first token "
        "(default: none, the first token is not scored)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help="exact-match tasks: stop string (repeatable; default newline)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.set_defaults(func=_eval)
