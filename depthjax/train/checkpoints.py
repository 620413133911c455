"""Training-run checkpoints: orbax, async, keep-last-N, atomic -- and sealed.

Once orbax has committed checkpoint N (renamed its temporary directory into place), a
background thread of process 0 writes N/depthjax-integrity.json: the SHA-256 of every
file orbax wrote (depthjax.files.integrity). Restoring verifies that record first (the
processes of a multi-host run split the reading), so bit rot, truncation or an edit of
any file is caught before a single weight is used. A checkpoint that fails it -- changed
bytes, or no record (the run stopped between orbax's commit and the seal: an unfinished
save) -- is moved to checkpoints_corrupt/N-TIME/ with a REASON.txt, and the next older
one is tried. Any other failure to restore (an I/O error, another parameter tree) is a
RestoreError and nothing is moved. Checkpoints older than the run's record (written before
depthjax sealed them) restore unverified, with a warning.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..errors import DepthjaxError
from ..files import integrity
from . import hosts
from .config import TrainConfig
from .logs import RunLog
from .step import TrainState

_COMMITTED = "commit_success.txt"  # orbax writes it into a step directory before the rename


class RestoreError(DepthjaxError):
    """A checkpoint whose files verify but that cannot be restored into this run."""


def _coordination_barriers() -> None:
    """Make orbax's barriers go through the coordination service. By default they are
    device collectives (sync_global_devices), issued from orbax's background threads while
    the main thread runs the train step's all-reduces: the two processes may then queue
    them in different orders, and gloo waits for a partner that never comes."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class TrainCheckpoints:
    """A training run's orbax CheckpointManager over DIR/checkpoints, items state (TrainState),
    data (grain iterator states) and meta (config, program). Native `dj.save` checkpoints of
    a finished model are depthjax.files.checkpoint's business.

    unsealed_before: steps below it may lack an integrity record (written before sealing)."""

    def __init__(self, directory: Path, tc: TrainConfig, *, unsealed_before: int = 0):
        self.directory = directory
        self.unsealed_before = unsealed_before
        self._async = tc.async_checkpoint
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=tc.keep_checkpoints,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._sealer: threading.Thread | None = None
        self._seal_error: BaseException | None = None
        self._stop = threading.Event()
        self._open()

    def _open(self):
        if jax.process_count() > 1:
            _coordination_barriers()
        self.manager = ocp.CheckpointManager(
            self.directory, options=self.options, item_names=("state", "data", "meta")
        )

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
        self._join_sealer()
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
        if jax.process_index() == 0:
            self._sealer = threading.Thread(
                target=self._seal_when_committed,
                args=(step,),
                daemon=True,
                name=f"depthjax-seal-{step}",
            )
            self._sealer.start()
        if not self._async:
            self.wait()

    def _seal_when_committed(self, step: int) -> None:
        final = self.directory / str(step)
        try:
            while not (final / _COMMITTED).exists():
                if self._stop.wait(0.02):
                    return
            if os.environ.get("DEPTHJAX_TEST_KILL_BEFORE_SEAL") == str(step):
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die before the seal
            integrity.seal(final, step=step)
        except BaseException as e:  # reported by the next save or wait
            self._seal_error = e

    def _join_sealer(self) -> None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        if self._seal_error is not None:
            error, self._seal_error = self._seal_error, None
            raise RuntimeError(f"sealing a checkpoint failed: {error}") from error

    def wait(self):
        """Block until the last save is committed and sealed."""
        try:
            self.manager.wait_until_finished()
        except BaseException:
            self._stop.set()
            raise
        self._join_sealer()
        hosts.barrier("depthjax-checkpoint-sealed")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # -- restoring -----------------------------------------------------------------------
    def problem(self, step: int, log: RunLog) -> str | None:
        """Why checkpoint `step` cannot be trusted, or None (agreed by all processes)."""
        d = self.directory / str(step)
        problem = None
        if not integrity.is_sealed(d):
            if step >= self.unsealed_before:
                problem = (
                    "it has no integrity record: the run stopped after orbax committed "
                    "it but before depthjax sealed it (an unfinished save)"
                )
            else:
                log.message(
                    f"WARNING: checkpoint {step} predates integrity records; "
                    "restoring it unverified"
                )
        else:
            try:
                integrity.verify(d, share=(jax.process_index(), jax.process_count()))
            except integrity.IntegrityError as e:
                problem = str(e)
        return hosts.first_problem(problem)

    def restore_latest(self, abstract_state, log: RunLog):
        """(step, state, data_state, meta) of the newest checkpoint that verifies and
        restores, or None; newer ones that fail verification are set aside with their
        reason. RestoreError when one that verifies cannot be restored."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.problem(step, log)
            if problem is None:
                try:
                    r = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore(),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
                except Exception as e:  # an I/O error, another parameter tree, ...
                    problem = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                problem = hosts.first_problem(problem)
                if problem is None:
                    return step, r.state, r.data, r.meta
                # Its bytes are the ones written: the failure is not corruption, and only a
                # failed integrity check may move a checkpoint.
                raise RestoreError(
                    f"checkpoint {step} in {self.directory} passed its integrity check but "
                    f"cannot be restored ({problem}); nothing was moved. A transient I/O "
                    "error: run again; a changed model, program or optimizer: train into "
                    "another --out (or --fresh)"
                )
            self._set_aside(step, problem, log)
        return None

    def _set_aside(self, step: int, problem: str, log: RunLog) -> None:
        aside = self.directory.parent / "checkpoints_corrupt" / f"{step}-{time.time():.0f}"
        msg = (
            f"checkpoint {step} in {self.directory} is unusable: {problem}; set aside to "
            f"{aside} (see REASON.txt there) and trying an older one"
        )
        warnings.warn(msg, stacklevel=3)
        log.message("WARNING: " + msg)
        self.manager.close()
        if jax.process_index() == 0:
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
            (aside / "REASON.txt").write_text(f"checkpoint {step}: {problem}\n")
        hosts.barrier(f"depthjax-set-aside-{step}")
        self._open()

    def close(self):
        try:
            self.manager.wait_until_finished()
            self._join_sealer()
        finally:
            self._stop.set()
            self.manager.close()
