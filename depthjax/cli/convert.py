"""`depthjax convert`: Hugging Face directories <-> native depthjax checkpoints, and GGUF.

    depthjax convert --from hf DIR --to OUT            HF -> native (dj.save; keeps ties)
    depthjax convert --from native DIR --to OUT        native -> HF (dj.hf.save)
    depthjax convert --from hf DIR --to OUT --to-format hf    HF -> HF (re-shard, rewrite)
    depthjax convert --from native DIR --to OUT.gguf [--dtype q8_0]   -> GGUF (llama.cpp;
        dj.gguf.save: gated-off sublayers stay skipped; `--to-format gguf` for other names)

Tokenizer files travel with the weights in every direction (into a GGUF file as its
tokenizer metadata).
"""

from __future__ import annotations

import argparse
import os
import time

from .common import add_load_args, read_model


def _convert(args) -> int:
    import depthjax as dj

    t0 = time.time()
    to_format = args.to_format or (
        "gguf"
        if str(args.out).endswith(".gguf")
        else "native"
        if args.source_format == "hf"
        else "hf"
    )
    if args.source_format == "hf":
        options = dict(kind="hf", progress=True, ignore_keys=tuple(args.ignore_key))
    else:
        options = dict(kind="depthjax")
    md = read_model(args.source, param_dtype=args.param_dtype, mesh=args.mesh, **options)
    model, files = md.model, md.files
    source_type = (md.hf_config or {}).get("model_type")  # hf -> hf keeps it
    print(
        f"[convert] read {args.source_format} {args.source}: {repr(model).splitlines()[0]}",
        flush=True,
    )
    if to_format == "gguf":
        info = dj.gguf.save(
            model,
            args.out,
            dtype=args.dtype,
            tokenizer=md.tokenizer,
            bos_token_id=md.special_token("bos_token_id"),
            eos_token_id=md.special_token("eos_token_id"),
            drop_adapters=args.drop_adapters,
            overwrite=args.overwrite,
        )
        files = []
        print(
            f"[convert] {info['architecture']} graph, {len(info['steps'])} layers; heads "
            f"{info['head_count']}, kv heads {info['head_count_kv']}, feed-forward "
            f"{info['feed_forward_length']}"
        )
    elif to_format == "hf":
        dj.hf.save(
            model,
            args.out,
            model_type=args.model_type or source_type,
            zero_gated=args.zero_gated,
            drop_adapters=args.drop_adapters,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            files=files,
            progress=True,
        )
    else:
        dj.save(model, args.out, files=files)
    names = [os.path.basename(f) for f in files]
    print(
        f"[convert] wrote {to_format} {args.out}"
        f"{' with ' + ', '.join(names) if names else ''} in {time.time() - t0:.1f}s"
    )
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert Hugging Face <-> native depthjax checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from",
        dest="source_format",
        choices=("hf", "native"),
        required=True,
        help="format of the source directory",
    )
    p.add_argument("source", metavar="DIR", help="source directory")
    add_load_args(p)
    p.add_argument("--to", dest="out", metavar="OUT", required=True, help="output directory")
    p.add_argument(
        "--to-format",
        choices=("hf", "native", "gguf"),
        default=None,
        help="output format (default: gguf for OUT ending in .gguf, else the other one)",
    )
    p.add_argument(
        "--dtype",
        choices=("f32", "f16", "q8_0"),
        default="f32",
        help="GGUF matrix type (default f32; norms and biases stay f32)",
    )
    p.add_argument(
        "--model-type",
        default=None,
        help="HF architecture to write (llama, mistral, qwen2, qwen3, gemma2, "
        "gemma3_text, olmo2, phi3, gpt2, bert; default: inferred from the "
        "config)",
    )
    p.add_argument(
        "--zero-gated",
        action="store_true",
        help="export gated-off sublayers as zeroed output weights",
    )
    p.add_argument(
        "--drop-adapters",
        action="store_true",
        help="export without any recovery adapter, foldable ones too (needed when "
        "one cannot be folded exactly; the export then differs from the model)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="HF shard size (default 5GB)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing HF checkpoint or GGUF file"
    )
    p.add_argument(
        "--ignore-key",
        action="append",
        default=[],
        help="config.json key to skip knowingly (repeatable)",
    )
    p.set_defaults(func=_convert)
