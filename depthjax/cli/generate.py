"""`depthjax generate --model DIR --prompt TEXT`: sample a continuation from a native
checkpoint (dj.save) or a Hugging Face directory, byte-level or with its tokenizer.json."""

from __future__ import annotations

import sys
import time

from .common import UsageError, add_load_args, count, natural, read_model


def _generate(args) -> int:
    import jax
    import numpy as np

    import depthjax as dj

    md = read_model(args.model, args.tokenizer, param_dtype=args.param_dtype, mesh=args.mesh)
    model, tok = md.model, md.tokenizer
    ids = tok.encode(args.prompt)
    if not ids.size:
        raise UsageError("the prompt encodes to no tokens")
    eos = args.eos_id if args.eos_id is not None else md.special_token("eos_token_id")
    kw = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        key=jax.random.key(args.seed),
        eos_id=eos,
        exit_at=args.exit_at,
        exit_threshold=args.exit_threshold,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
    )
    print(f"[generate] {repr(model).splitlines()[0]}; prompt {ids.size} tokens", flush=True)
    t0 = time.time()
    out = dj.generate(model, ids[None], args.max_new_tokens, **kw)
    n = int(out.lengths[0])
    elapsed = time.time() - t0
    print(args.prompt + tok.decode(np.asarray(out.tokens[0, :n])))
    exits = np.asarray(out.exit_steps[0, :n])
    how = (
        f"self-speculative: draft {args.draft} steps accepted {out.draft.acceptance:.0%} of "
        f"{int(out.draft.drafted[0])} proposals in {int(out.draft.rounds[0])} verification "
        "passes"
        if out.draft is not None
        else f"mean steps per token {exits.mean():.2f} of {model.depth}"
    )
    print(
        f"[generate] {n} tokens in {elapsed:.2f}s including compilation; KV cache "
        f"{out.cache.nbytes / 2**20:.2f} MiB in {out.cache.n_slots} step slots; {how}",
        file=sys.stderr,
    )
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("generate", help="sample a continuation of a prompt")
    p.add_argument("--model", required=True, help="native checkpoint or Hugging Face directory")
    add_load_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)  # the library names a bad one
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=count, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json (default: the model directory's, else byte)",
    )
    p.add_argument(
        "--eos-id",
        type=int,
        default=None,
        help="stop token (default: eos_token_id of a Hugging Face config)",
    )
    p.add_argument("--exit-at", type=int, default=None, help="run only the first K steps")
    p.add_argument(
        "--exit-threshold",
        type=float,
        default=None,
        help="per-token early exit at this max softmax probability",
    )
    p.add_argument(
        "--draft",
        type=int,
        default=None,
        metavar="K",
        help="self-speculative decoding: draft with the first K steps, verify with "
        "all (same output as without; faster when drafts are accepted)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=4,
        metavar="N",
        help="draft tokens proposed per verification pass (with --draft)",
    )
    p.set_defaults(func=_generate)
