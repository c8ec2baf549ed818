"""One small wrapper around Orbax for training checkpoints.

Each checkpoint ``<directory>/<step>/`` holds three items: ``state`` (the train-state pytree, restored into an
abstract target that carries the current shardings), ``data`` (the Grain iterator state, JSON) and ``meta``
(JSON: config, dsjax/jax versions, mesh, process count, step). Orbax writes into a temporary directory and
renames it when complete, so a half-written checkpoint is never picked up; saves are asynchronous; the last
``keep`` are kept.

Restoring first compares the stored tree (paths, shapes, dtypes) with the target and raises
:class:`CheckpointMismatchError` listing every difference, instead of failing deep inside Orbax. Nothing is ever
deleted on a failed restore.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointMismatchError", "CheckpointReadError"]


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model/optimizer layout."""


class CheckpointReadError(RuntimeError):
    """The checkpoint directory is unreadable (corrupt, foreign, or missing items)."""


def _keystr(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
        out[_keystr(path)] = (shape, dtype)
    return out


class Checkpointer:
    """Orbax ``CheckpointManager`` with the dsjax item layout and checks.

    Args:
      directory: where step folders live (created).
      every: save interval in steps (``save`` ignores other steps unless ``force``).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread (call :meth:`wait` before exiting).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int = 100, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointReadError(f"{self.directory} exists and is not a directory. Fix: choose another workdir")
        self.every = every
        self._mgr = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                                 enable_async_checkpointing=async_save, create=True),
        )

    # ------------------------------------------------------------------------------------------- queries
    def latest_step(self) -> int | None:
        """The newest complete checkpoint (temporary / half-written folders are ignored)."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def stored_meta(self, step: int) -> dict[str, Any]:
        try:
            return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - anything Orbax raises here means unreadable
            raise CheckpointReadError(f"cannot read the metadata of checkpoint {self.directory / str(step)}: "
                                      f"{type(e).__name__}: {e}. Fix: point --workdir elsewhere or remove the "
                                      f"damaged step folder yourself (nothing was deleted)") from e

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises :class:`CheckpointMismatchError` listing paths whose shape/dtype differ, are missing or extra."""
        try:
            stored = self._mgr.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointReadError(f"cannot read checkpoint {self.directory / str(step)}: {type(e).__name__}: "
                                      f"{e}. Fix: check the directory; nothing was deleted") from e
        if stored is None:
            raise CheckpointReadError(f"checkpoint {self.directory / str(step)} has no 'state' item (a foreign "
                                      f"or damaged checkpoint). Fix: use another workdir; nothing was deleted")
        tree = getattr(stored, "tree", stored)
        have = _flat_shapes(tree)
        want = _flat_shapes(abstract_state)
        problems = []
        order = lambda k: (k.startswith("opt_state"), k)  # model parameters first, optimizer moments last
        for k in sorted(set(want) | set(have), key=order):
            if k not in have:
                problems.append(f"missing in checkpoint: {k} {want[k][0]}")
            elif k not in want:
                problems.append(f"not in the current model: {k} {have[k][0]}")
            elif have[k][0] != want[k][0]:
                problems.append(f"shape {k}: checkpoint {have[k][0]} vs model {want[k][0]}")
        if problems:
            shown = "\n  ".join(problems[:30])
            more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match the current configuration "
                f"({len(problems)} differences):\n  {shown}{more}\nFix: resume with the config it was written with "
                f"(see its meta: {self.directory / str(step) / 'meta'}) or use a new --workdir.")

    # ------------------------------------------------------------------------------------------- save / restore
    def save(self, step: int, state: Any, data_state: dict[str, Any] | None, meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """Starts an (async) save of ``state`` and the data iterator state; returns whether a save started."""
        if not force and not self._mgr.should_save(step):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        return bool(self._mgr.save(step, args=args, force=force))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """``-> (state, data_state, meta)``; ``abstract_state`` leaves may carry ``sharding``."""
        self.check_compatible(step, abstract_state)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  data=ocp.args.JsonRestore(),
                                                                  meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointReadError(f"restoring {self.directory / str(step)} failed: {type(e).__name__}: {e}. "
                                      f"Fix: the checkpoint may be damaged; nothing was deleted") from e
        return out["state"], out["data"], out["meta"]

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
