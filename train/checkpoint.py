"""Orbax checkpoints of {train state, data iterator state}: async save, restore onto any mesh."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.workdir import RunDir

log = logging.getLogger(__name__)


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run (one-line message)."""


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_names(tree: Any) -> dict[str, Any]:
    """Leaves keyed by a dotted path (`params.layers.attn.q`), the way orbax names them."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(e) for e in path): leaf for path, leaf in flat}


class Checkpointer:
    """Keeps the last `keep` checkpoints under `<workdir>/checkpoints`, saving every `every` steps."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoint.every={every} and checkpoint.keep={keep} must both be positive")
        self.run = RunDir(workdir)
        self.directory = str(self.run.checkpoints)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Starts an async save of step `step` (returns once arrays are copied off the devices)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=True)

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError naming the first parameter whose shape differs from this run's."""
        saved = {name: md for name, md in leaf_names(self.manager.item_metadata(step)["state"]).items()}
        wanted = leaf_names(abstract_state)
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} has no entry {missing[0]!r} ({len(missing)} missing); "
                "it was written by a different model or optimizer config"
            )
        for name, want in wanted.items():
            got = tuple(saved[name].shape)
            if got != tuple(want.shape):
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step}: {name} has shape {got} but this config needs "
                    f"{tuple(want.shape)}; use the checkpoint's config or a new --workdir"
                )
        extra = sorted(set(saved) - set(wanted))
        if extra:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} has entry {extra[0]!r} that this config does not "
                f"({len(extra)} extra); it was written by a different model or optimizer config"
            )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
        """Restores `(step, state, data_state)` into the shardings carried by `abstract_state`.

        Without `step`, takes the latest checkpoint and falls back to older ones
        if it cannot be read (for example a save cut short by a crash).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        for i, s in enumerate(steps):
            try:
                self.check_compatible(s, abstract_state)
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
                restored = self.manager.restore(s, args=args)
                self._set_aside(steps[:i])
                return s, restored.state, restored.data
            except CheckpointError:
                raise  # a readable checkpoint of another config: falling back would hide it
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint may fail in many ways
                if i == len(steps) - 1:
                    raise CheckpointError(f"could not restore any checkpoint in {self.directory}: {e}") from e
                log.warning("checkpoint %d in %s is unreadable (%s); trying an older one", s, self.directory, e)
        raise AssertionError("unreachable")

    def _set_aside(self, damaged: list[int]) -> None:
        """Moves unreadable checkpoints out of the way (never deletes them) so their steps can be saved again."""
        if not damaged:
            return
        if jax.process_index() == 0:
            aside = str(self.run.damaged_checkpoints)
            os.makedirs(aside, exist_ok=True)
            for step in damaged:
                target = os.path.join(aside, f"{step}.{int(time.time())}")
                os.rename(os.path.join(self.directory, str(step)), target)
                log.warning("moved unreadable checkpoint %d to %s", step, target)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
