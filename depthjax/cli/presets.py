"""`depthjax presets`: list the named model configs."""

from __future__ import annotations


def _presets(args) -> int:
    from .. import configs as presets

    for name in presets.names():
        cfg = presets.get(name)
        print(
            f"{name:14} {cfg.family:6} d_model={cfg.d_model:<5} layers={cfg.n_layers:<3} "
            f"heads={cfg.n_heads}/{cfg.n_kv_heads} vocab={cfg.vocab_size}"
        )
    return 0


def add_command(sub) -> None:
    sub.add_parser("presets", help="list named model configs").set_defaults(func=_presets)
