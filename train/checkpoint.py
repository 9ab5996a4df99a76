"""Orbax checkpoints of {train state, data iterator state}, verified on restore.

Each checkpoint holds three orbax items: `state` (the TrainState arrays),
`data` (every process's data-iterator position) and `digest`: a sealed record
of the step, every array's shape, dtype and digest (`train.digest`), the data
record's SHA-256, the process count and, for an import, where the weights came
from. A checkpoint is used only if all of it verifies: the record's seal and
step, the arrays' digests, finiteness, the state's own step, the data record's
digest and layout, and each process's batch count against the step. Anything
else is damage: the checkpoint is moved to `damaged_checkpoints/` with a
one-line warning and the next older one is tried. Only a checkpoint whose
sealed record is intact and describes other shapes is reported as a config
mismatch (CheckpointError), and nothing is moved then. When no checkpoint is
usable, all stay where they are and restore raises one line naming each one's
damage, so no rerun silently starts over.

`read_only=True` (herd eval / sample / convert) never creates, renames, moves
or deletes anything. Nothing is created before the first save. A save that
fails (e.g. a full disk, in orbax's background thread) is reported by
`check()`, the next `save()` or `close()` as one line naming the checkpoint and
the cause, and its half-written temporary folder is removed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from train import orbax_quiet
from train.digest import json_digest, leaf_path, tree_digests
from train.workdir import RunDir

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
RECORD_ITEM = "digest"
# Keys under which a data-iterator state counts the batches it has yielded (tfds: batches; synthetic: step).
_BATCH_COUNT_KEYS = ("batches", "step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run, or a save that failed (one-line message)."""


class Damaged(Exception):
    """A checkpoint that is unreadable or does not verify (the reason is one line)."""


def gather_process_states(state: dict[str, Any]) -> dict[str, Any]:
    """Every process's JSON-able data-iterator state, keyed by process index.

    Orbax writes JSON items from the primary process only, so the states are
    all-gathered first; each process then finds its own on restore.
    """
    if jax.process_count() == 1:
        return {"0": state}
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return {str(i): json.loads(bytes(blobs[i, : lengths[i]])) for i in range(jax.process_count())}


def own_process_state(states: dict[str, Any]) -> Any:
    """This process's entry of `gather_process_states`, or a clear error if the layout changed."""
    key = str(jax.process_index())
    if key not in states:
        raise CheckpointError(
            f"the checkpoint holds data states of processes {sorted(states)}, none for process {key}; "
            "resume with the process count it was written with"
        )
    return states[key]


def leaf_names(tree: Any) -> dict[str, Any]:
    """Leaves keyed by a dotted path (`params.layers.attn.q`), the way orbax names them."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_path(path): leaf for path, leaf in flat}


def make_record(step: int, state: Any, data_state: Any, imported_from: str | None = None) -> dict[str, Any]:
    """The sealed digest record of a checkpoint (computes every array's digest on its devices)."""
    digests = tree_digests(state)
    bad = [name for name, d in digests.items() if not d["finite"]]
    if bad:
        raise CheckpointError(f"checkpoint {step} not saved: {bad[0]} holds NaN or infinite values "
                              f"({len(bad)} arrays); the previous checkpoints are kept")
    leaves = {name: {"shape": list(x.shape), "dtype": str(x.dtype), "digest": digests[name]["digest"]}
              for name, x in leaf_names(state).items()}
    record = {"format": RECORD_FORMAT, "step": int(step), "leaves": leaves, "data": json_digest(data_state),
              "processes": jax.process_count(), "imported_from": imported_from}
    return record | {"seal": json_digest(record)}


class Checkpointer:
    """Keeps the last `keep` checkpoints under `<workdir>/checkpoints`, saving every `every` steps."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True,
                 read_only: bool = False):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoint.every={every} and checkpoint.keep={keep} must both be positive")
        orbax_quiet.install()
        self.run = RunDir(workdir)
        self.directory = str(self.run.checkpoints)
        self.every, self.read_only = every, read_only
        self._saving: int | None = None  # the step of a save that may still be running in the background
        if read_only:  # (save_interval_steps=0 and create=False are what orbax would force, with a warning each)
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
            # create=False: the folder appears with the first save, not when a run fails validation.
            # cleanup_tmp_directories: a save cut short by a crash leaves no half-written folder behind.
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   create=False, cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    RECORD_ITEM: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------------------------------ listing

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if os.path.isdir(self.directory) else []

    def latest_step(self) -> int | None:
        """The newest step whose sealed record names it; else the newest step folder (restore then explains)."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                self._read_record(step)
                return step
            except Damaged:
                continue
        return steps[-1] if steps else None

    def should_save(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, imported_from: str | None = None) -> None:
        """Starts an async save of step `step` (returns once arrays are copied off the devices).

        `imported_from` marks a checkpoint of imported weights (no data has been read yet).
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; checkpoint {step} not saved")
        self.check(wait=True)  # a failed earlier save is reported before another starts
        data_state = json.loads(json.dumps(data_state))  # as orbax will store it: what the digest covers
        record = make_record(step, state, data_state, imported_from)
        os.makedirs(self.directory, exist_ok=True)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  **{RECORD_ITEM: ocp.args.JsonSave(record)})
        self._saving = step
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            self._failed(step, e)
        if not self.manager.is_saving_in_progress():
            self.check(wait=True)  # a synchronous save: report a failure now

    def check(self, wait: bool = False) -> None:
        """Raises CheckpointError at once if the last save failed; `wait` first waits for one in progress.

        Cheap without `wait` (the loop may call it every step).
        """
        if self._saving is None or (not wait and self.manager.is_saving_in_progress()):
            return
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._failed(step, e)
        # Orbax's finalisation logs (and does not raise) some failures: the step's folder must have been committed.
        if not os.path.isdir(os.path.join(self.directory, str(step))):
            self._failed(step, RuntimeError("orbax did not commit it"))

    def _failed(self, step: int, error: BaseException) -> None:
        """Removes the failed save's temporary folder (herd's own, half written) and raises one line."""
        if jax.process_index() == 0:
            for tmp in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.manager.reload()  # orbax may still list the step it failed to commit
        except Exception:  # noqa: BLE001 - the listing is only used for the message below
            pass
        kept = [s for s in self.all_steps() if s != step]
        raise CheckpointError(f"saving checkpoint {step} to {self.directory}/{step} failed: {_cause(error)}; "
                              f"nothing half-written was left behind; "
                              + (f"the latest good checkpoint is step {kept[-1]}" if kept else "no checkpoint is kept"))

    # ------------------------------------------------------------------------------------------ restoring

    def restore(self, abstract_state: Any, step: int | None = None, *, data_iterator: Any = None
                ) -> tuple[int, Any, dict[str, Any]]:
        """Restores `(step, state, data_state)` into the shardings (and dtypes) of `abstract_state`.

        Without `step`, takes the newest checkpoint that verifies, setting damaged newer ones
        aside (unless read-only). `data_iterator`, if given, is moved to its position once the
        data record has verified; a position it rejects belongs to another data config
        (CheckpointError, nothing moved).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        damaged: list[tuple[int, str]] = []
        restored = None
        for s in steps:
            try:
                restored = self._restore_verified(s, abstract_state, data_iterator)
                break
            except Damaged as e:
                damaged.append((s, str(e)))
                log.warning("checkpoint %s/%d is damaged (%s); %s", self.directory, s, e,
                            "trying an older one" if s != steps[-1] else "no older checkpoint to fall back to")
        _agree_across_processes(restored[0] if restored else -1, self.directory)
        if restored is None:
            reasons = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise CheckpointError(f"no usable checkpoint in {self.directory} ({reasons}); they were left in place: "
                                  "move them away to start over, or use a new --workdir")
        self._set_aside([d for d, _ in damaged])
        return restored

    def _read_record(self, step: int) -> dict[str, Any]:
        """The sealed record of `step`, or Damaged."""
        try:
            record = ocp.JsonCheckpointHandler().restore(epath.Path(self.directory) / str(step) / RECORD_ITEM)
        except Exception as e:  # noqa: BLE001 - missing, unreadable, not JSON
            raise Damaged(f"its digest record is unreadable: {_first_line(e)}") from None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise Damaged(f"its digest record is not format {RECORD_FORMAT}")
        body = {k: v for k, v in record.items() if k != "seal"}
        if record.get("seal") != json_digest(body):
            raise Damaged("its digest record does not match its seal")
        if record["step"] != step:
            raise Damaged(f"its digest record is of step {record['step']}: the folder was renamed or copied")
        return record

    def check_compatible(self, step: int, abstract_state: Any, record: dict[str, Any] | None = None) -> None:
        """Raises CheckpointError naming the first array whose shape differs from this run's (a config mismatch)."""
        saved = (record or self._read_record(step))["leaves"]
        wanted = leaf_names(abstract_state)
        where = f"checkpoint {self.directory}/{step}"
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise CheckpointError(f"{where} has no entry {missing[0]!r} ({len(missing)} missing); it was written by "
                                  "a different model or optimizer config")
        for name, want in wanted.items():
            if tuple(saved[name]["shape"]) != tuple(want.shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(saved[name]['shape'])} but this config needs "
                                      f"{tuple(want.shape)}; use the checkpoint's config or a new --workdir")
        extra = sorted(set(saved) - set(wanted))
        if extra:
            raise CheckpointError(f"{where} has entry {extra[0]!r} that this config does not ({len(extra)} extra); "
                                  "it was written by a different model or optimizer config")

    def _restore_verified(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[int, Any, dict]:
        record = self._read_record(step)
        self.check_compatible(step, abstract_state, record)
        # Restore in the saved dtypes (what the digests are of), cast to this run's afterwards.
        saved = record["leaves"]
        paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
        target = treedef.unflatten([jax.ShapeDtypeStruct(x.shape, np.dtype(saved[leaf_path(p)]["dtype"]),
                                                         sharding=x.sharding) for p, x in paths])
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
            state, data = restored.state, restored.data
        except Exception as e:  # noqa: BLE001 - truncated, zeroed or missing files fail in many ways
            raise Damaged(f"unreadable: {_first_line(e)}") from None
        digests = tree_digests(state)
        for name, want in saved.items():
            if digests[name]["digest"] != want["digest"]:
                raise Damaged(f"{name} does not match its digest")
            if not digests[name]["finite"]:
                raise Damaged(f"{name} holds NaN or infinite values")
        if hasattr(state, "step") and int(jax.device_get(state.step)) != step:
            raise Damaged(f"its train state is at step {int(jax.device_get(state.step))}")
        _check_data(step, data, record)
        state = jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), state, abstract_state)
        if data_iterator is not None and data["train"] is not None:
            # The record verified, so a position the iterator rejects belongs to another data config.
            try:
                data_iterator.set_state(own_process_state(data["train"]))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint {self.directory}/{step}: {_first_line(e)}") from None
        if record.get("imported_from") is not None:
            data = {**data, "imported_from": record["imported_from"]}  # said explicitly, not implied by no position
        return step, state, data

    def _set_aside(self, damaged: list[int]) -> None:
        """Moves damaged checkpoints out of the way (never deletes them) so their steps can be saved again."""
        if not damaged or self.read_only:
            return
        if jax.process_index() == 0:
            aside = str(self.run.damaged_checkpoints)
            for step in damaged:
                source = os.path.join(self.directory, str(step))
                if not os.path.isdir(source):  # listed by orbax but never committed
                    continue
                os.makedirs(aside, exist_ok=True)
                target = os.path.join(aside, f"{step}.{int(time.time())}")
                while os.path.exists(target):  # never onto an earlier one
                    target += "+"
                os.rename(source, target)
                log.warning("moved damaged checkpoint %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("herd_checkpoint_set_aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for a save in progress (raising one line if it failed) and releases orbax's threads."""
        try:
            self.check(wait=True)
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - a failed save was reported above; orbax raises it again here
                pass


def _agree_across_processes(step: int, directory: str) -> None:
    """Every process must resume from the same step (each verified the checkpoints on its own)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    steps = np.asarray(multihost_utils.process_allgather(np.int32(step))).reshape(-1)
    if (steps != step).any():
        raise CheckpointError(f"the processes found different usable checkpoints in {directory} (steps "
                              f"{steps.tolist()}, -1 for none): is the folder shared by every host?")


def _check_data(step: int, data: Any, record: dict[str, Any]) -> None:
    """Raises Damaged unless `data` is the record's data state with a position for every process at `step`."""
    if json_digest(data) != record["data"]:
        raise Damaged("its data-iterator record does not match its digest")
    if not isinstance(data, dict) or "train" not in data:
        raise Damaged("its data-iterator record has no 'train' entry")
    states = data["train"]
    if states is None:
        if record.get("imported_from") is None:
            raise Damaged("it has no data-iterator position and was not imported")
        return
    expected = [str(i) for i in range(record["processes"])]
    if not isinstance(states, dict) or sorted(states) != sorted(expected):
        raise Damaged(f"its data-iterator record does not hold one position per process ({len(expected)})")
    for key in expected:
        if not isinstance(states[key], dict):
            raise Damaged(f"the data-iterator position of process {key} is not a JSON object")
        count = next((states[key][k] for k in _BATCH_COUNT_KEYS if k in states[key]), None)
        if count is not None and count != step:
            raise Damaged(f"the data-iterator position of process {key} is after {count} batches, "
                          f"but the train state is at step {step}")


def _cause(error: BaseException) -> str:
    """The operating-system error behind a failed write when there is one (tensorstore only names its code)."""
    seen: BaseException | None = error
    for _ in range(8):  # along the chain of causes
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)} (errno {seen.errno})"
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
        seen = seen.__cause__ or seen.__context__
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    """The innermost cause, on one line: orbax wraps tensorstore's error in a message dumping its whole spec."""
    for _ in range(8):
        if error.__cause__ is None:
            break
        error = error.__cause__
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0] or type(error).__name__
    return text if len(text) < 300 else text[:300] + "..."
