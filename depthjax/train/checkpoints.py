"""Training-run checkpoints: orbax, async, keep-last-N, atomic; a checkpoint that fails
to restore is moved aside to checkpoints_corrupt/ and the next older one is used."""

from __future__ import annotations

import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from .config import TrainConfig
from .logs import RunLog
from .step import TrainState


class TrainCheckpoints:
    """A training run's orbax CheckpointManager over DIR/checkpoints, items state (TrainState),
    data (grain iterator state) and meta (config, program). Native `dj.save` checkpoints of a
    finished model are depthjax.checkpoint's business."""

    def __init__(self, directory: Path, tc: TrainConfig):
        self.directory = directory
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=tc.keep_checkpoints,
            enable_async_checkpointing=tc.async_checkpoint,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._open()

    def _open(self):
        self.manager = ocp.CheckpointManager(
            self.directory, options=self.options, item_names=("state", "data", "meta")
        )

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if os.environ.get("DEPTHJAX_TEST_KILL_IN_SAVE") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: die mid-save

    def restore_latest(self, abstract_state, log: RunLog):
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                r = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                return step, r.state, r.data, r.meta
            except Exception as e:  # any failure to read means this checkpoint is unusable
                msg = (
                    f"checkpoint {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e)[:200]}); moving it aside and trying "
                    "an older one"
                )
                warnings.warn(msg, stacklevel=2)
                log.message("WARNING: " + msg)
                if jax.process_index() == 0:
                    aside = self.directory.parent / "checkpoints_corrupt"
                    aside.mkdir(exist_ok=True)
                    shutil.move(
                        str(self.directory / str(step)), str(aside / f"{step}-{time.time():.0f}")
                    )
                self.manager.close()
                self._open()
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
