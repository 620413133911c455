"""Training: `depthjax.train.run(out_dir, TrainConfig)`, sharded, checkpointed, resumable.

    config       TrainConfig / MeshConfig, parsed from key=value arguments and YAML
    step         TrainState, optimizer, learning-rate schedule, the jitted train step
    loop         run(): mesh, data, the loop, evaluation, the final model
    checkpoints  TrainCheckpoints: the run's orbax checkpoints (state, data iterator, meta),
                 sealed with the SHA-256 of every file and verified before restore
    run_dir      run.json (which run a directory holds), run.lock (who writes it)
    hosts        what the processes of a multi-host run agree on
    logs         RunLog: metrics.jsonl, TensorBoard events, console lines
    flops        FLOPs per token and accelerator peaks (MFU)
    layerskip    LayerSkip: layer dropout and early-exit losses (early-exit training)

Names resolve lazily so that `depthjax train --help` does not import the data stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "MeshConfig": "config",
    "TrainConfigError": "config",
    "parse": "config",
    "help_text": "config",
    "TrainState": "step",
    "optimizer": "step",
    "learning_rate": "step",
    "train_step": "step",
    "run": "loop",
    "model_paths": "loop",
    "NonFiniteLossError": "loop",
    "maybe_initialize_distributed": "loop",
    "TrainCheckpoints": "checkpoints",
    "RunLog": "logs",
    "RunDirError": "run_dir",
    "RunInUse": "run_dir",
    "DifferentRun": "run_dir",
    "LayerSkip": "layerskip",
    "LayerSkipError": "layerskip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
