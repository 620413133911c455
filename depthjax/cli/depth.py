"""`depthjax depth`: apply a slice spec (or print one) for a native checkpoint.

depthjax depth --spec variant.yaml --in CKPT --out CKPT [--compact]
depthjax depth --in CKPT                    # print the checkpoint's program as a spec
"""

from __future__ import annotations

import argparse

from .common import UsageError, check_out_dir, read_model


def _depth(args) -> int:
    import yaml

    from ..depth import compact, from_spec, load_spec, to_spec
    from ..files import checkpoint

    md = read_model(args.input, kind="depthjax")
    model = md.model
    if args.spec is None:
        print(yaml.safe_dump(to_spec(model), sort_keys=False), end="")
        return 0
    if args.out is None:
        raise UsageError("--spec needs --out")
    check_out_dir(args.out, checkpoint=True)
    model = from_spec(model, load_spec(args.spec))
    if args.compact:
        model = compact(model)
    checkpoint.save(model, args.out, files=md.files)
    print(f"wrote {args.out}: {model.depth} steps over {model.n_blocks} table rows")
    print(model.program)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "depth",
        help="apply a depth spec (layer slices, gates, ties, "
        "parallel groups) to a checkpoint, or print a checkpoint's spec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--in",
        dest="input",
        required=True,
        help="native checkpoint directory "
        "(convert a Hugging Face one first: depthjax convert --from hf DIR --to CKPT)",
    )
    p.add_argument("--spec", help="YAML or JSON slice spec (see depthjax.depth.spec)")
    p.add_argument("--out", help="where to write the new checkpoint")
    p.add_argument(
        "--compact", action="store_true", help="drop table rows the new program does not use"
    )
    p.set_defaults(func=_depth)
