"""Orbax checkpoints: periodic async saves, last K + best by metric, resume.

Each step directory holds `state` (the whole TrainState), `variables` (the
EMA model variables, what `effdet_jax.load(workdir)` opens) and, from a
training run, `data` (JSON: every host's input position, data/position.py):
together enough to resume bit-exactly. Saves are atomic (orbax writes to a
temporary directory and renames). Restoring takes the target shardings from
the abstract state, so a checkpoint opens on a different mesh.

Resume never destroys a run:
- a checkpoint whose tree differs from the configured state (a changed
  config) stops the run with `CheckpointMismatchError`, naming the leaves;
- a step that cannot be read at all is moved aside to
  `checkpoints/corrupt-<step>` (outside orbax's step listing, so retention
  never counts or deletes it) and the previous step is used;
- readers (`effdet_jax.load`, `--mode=eval`, `tools.infer`, `init_from`)
  fall back to the newest readable step the same way, without moving
  anything, and say so in one line.

Readers open saved weights in one place, `restore_read_only`: a training
workdir's checkpoints or a directory written by `effdet_jax.save` / the
converter. Orbax is handed `checkpoint_dir(workdir)`, an `epath.Path`, so a
gs:// workdir stays a URL (files.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from effdet_jax import api, files

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_PREFIX = 'corrupt-'
_MAX_LISTED = 8  # leaves named in a mismatch message (then a count)


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose tree is not the configured state's."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """`WORKDIR/checkpoints`, what orbax is handed (a URL stays a URL)."""
  return files.path(workdir) / CHECKPOINT_DIR


def saved_variables_dir(path: str) -> epath.Path:
  """`PATH/variables` of a directory written by `effdet_jax.save` or the
  converter, what orbax is handed."""
  return files.path(path) / api.VARIABLES_DIR


def is_training_workdir(path: str) -> bool:
  """True when `path` holds training checkpoints (else it may be a
  directory written by `effdet_jax.save` or the converter)."""
  return files.isdir(checkpoint_dir(path))


class Checkpointer:
  """Thin policy layer over `ocp.CheckpointManager`."""

  def __init__(
    self,
    workdir: str,
    every_steps: int,
    keep: int,
    best_metric: str = 'AP',
    keep_best: int = 1,
    async_save: bool = True,
  ):
    directory = checkpoint_dir(workdir)
    self.directory = str(directory)
    self.best_metric = best_metric
    policies = [cm.LatestN(n=max(keep, 1))]
    if keep_best > 0 and best_metric:
      policies.append(
        cm.BestN(
          get_metric_fn=lambda m: m[best_metric],
          n=keep_best,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(every_steps, 1),
      preservation_policy=cm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
      directory,
      options=options,
      item_names=('state', 'variables', 'data'),
    )

  def save(
    self,
    step: int,
    state: Any | Callable[[], Any],
    metrics: dict[str, float] | None = None,
    force: bool = False,
    data: Callable[[], dict | None] | None = None,
  ) -> bool:
    """Saves at `step` if the interval (or `force`) says so; `data()`
    (called on every process, only when saving) gives the `data` item.
    `state` may be a function returning it, called only when saving."""
    if not force and not self.manager.should_save(step):
      return False
    if callable(state):
      state = state()
    if not _all_finite(state):
      raise FloatingPointError(
        f'refusing to checkpoint step {step}: the state is not finite'
      )
    items = {
      'state': ocp.args.StandardSave(state),
      'variables': ocp.args.StandardSave(state.variables(ema=True)),
    }
    payload = data() if data is not None else None
    if payload is not None:
      items['data'] = ocp.args.JsonSave(payload)
    args = ocp.args.Composite(**items)
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore_data(self, step: int) -> dict | None:
    """The `data` item of `step`; None for a checkpoint without one."""
    if not files.exists(files.join(self.directory, str(step), 'data')):
      return None
    out = self.manager.restore(
      step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
    )
    return dict(out.data)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any) -> Any | None:
    """The newest readable state (None when there is none).

    Raises CheckpointMismatchError when the newest step is readable but
    holds another tree (nothing is moved or deleted then); an unreadable
    step is moved aside (`set_aside`) and the previous one tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)
          ),
        )
        return out.state
      except Exception as err:  # noqa: BLE001 - classified below
        differences = tree_differences(self.manager, step, abstract_state)
        if differences:
          raise CheckpointMismatchError(
            mismatch_message(self.directory, step, differences)
          ) from err
        moved = self.set_aside(step)
        logging.warning(
          'checkpoint step %d is unreadable (%s); moved it to %s and trying '
          'the previous step',
          step,
          short_error(err),
          moved,
        )
    return None

  def set_aside(self, step: int) -> str:
    """Moves an unreadable step to `corrupt-<step>` (process 0 renames,
    every process waits and re-lists); returns the new path."""
    src = files.join(self.directory, str(step))
    dst = files.join(self.directory, f'{CORRUPT_PREFIX}{step}')
    n = 1
    while files.exists(dst):
      n += 1
      dst = files.join(self.directory, f'{CORRUPT_PREFIX}{step}.{n}')
    if jax.process_index() == 0 and files.exists(src):
      files.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices(f'effdet_jax set aside {step}')
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _all_finite(tree: Any) -> bool:
  """True when every float leaf is finite (checked on this host's shards).

  On the host with numpy: an eager or jitted check over a D0 state's ~2,300
  leaves compiles for tens of seconds, a host scan of its 17M values takes
  tens of milliseconds. Replicated leaves read one local copy.
  """
  for x in jax.tree.leaves(tree):
    if not (hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)):
      continue
    shards = getattr(x, 'addressable_shards', None)
    if shards:
      seen = set()
      datas = []
      for sh in shards:
        key = str(sh.index)
        if key not in seen:
          seen.add(key)
          datas.append(sh.data)
    else:
      datas = [x]
    for d in jax.device_get(datas):
      if not np.isfinite(np.asarray(d, np.float32)).all():
        return False
  return True


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager that reads a workdir's checkpoints and never writes (nor
  creates the folder); close it after use. `restore_read_only` is the
  readers' way in; this is for a caller that lists the steps itself."""
  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    item_names=('state', 'variables'),
    # save_interval_steps=0: what read_only implies (orbax warns otherwise).
    options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0
    ),
  )


def restore_newest_readable(
  manager: ocp.CheckpointManager,
  restore: Callable[[int], Any],
  step: int | None = None,
) -> tuple[int, Any]:
  """`(step, restore(step))` for the newest step that reads (or exactly
  `step`). A step that fails is reported in one line and the previous one
  tried; nothing is moved (readers never change a workdir).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
        f'no checkpoint at step {step} in {manager.directory}; steps there: '
        f'{sorted(steps)}'
      )
    return step, restore(step)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  errors = []
  for s in steps:
    try:
      out = restore(s)
    except Exception as err:  # noqa: BLE001 - any unreadable step
      errors.append(f'step {s}: {short_error(err)}')
      continue
    if errors:
      logging.warning(
        'checkpoint %s unreadable; using step %d', '; '.join(errors), s
      )
    return s, out
  raise FileNotFoundError(
    f'no readable checkpoint in {manager.directory}: ' + '; '.join(errors)
  )


def restore_read_only(
  path: str, items: Mapping[str, Any], step: int | None = None
) -> tuple[int | None, dict[str, Any]]:
  """`(step, {item: tree})`: saved weights opened for reading, never
  written; the one way readers open them (`effdet_jax.load`, `--mode=eval`,
  `init_from`, the tools).

  `path` is a training workdir (its `checkpoints/`: the newest readable
  step, or exactly `step`) or a directory written by `effdet_jax.save` or
  the converter (its `variables/`; step None). `items` maps what to read,
  'variables' (the EMA model variables) and/or 'state' (the whole
  TrainState; workdirs only), to the abstract tree to restore onto, or to
  None for the tree as saved (nested dicts). A local path or a URL.
  Raises FileNotFoundError when `path` holds neither.
  """
  if is_training_workdir(path):
    manager = read_only_manager(path)
    args = ocp.args.Composite(
      **{k: ocp.args.StandardRestore(v) for k, v in items.items()}
    )
    try:
      return restore_newest_readable(
        manager, lambda s: dict(manager.restore(s, args=args)), step
      )
    finally:
      manager.close()
  saved = saved_variables_dir(path)
  if not files.isdir(saved):
    raise FileNotFoundError(
      f'no checkpoint in {checkpoint_dir(path)} and no {api.VARIABLES_DIR}/'
      ' of effdet_jax.save in ' + files.absolute(path)
    )
  if set(items) != {'variables'}:
    raise ValueError(
      f'{files.absolute(path)} holds model variables only (written by '
      f'effdet_jax.save or the converter), not {sorted(items)}'
    )
  with ocp.StandardCheckpointer() as reader:
    return None, {'variables': reader.restore(saved, items['variables'])}


def restore_variables(workdir: str, abstract_variables: Any, step=None) -> Any:
  """EMA model variables of a training workdir (newest readable step by
  default)."""
  _, out = restore_read_only(workdir, {'variables': abstract_variables}, step)
  return out['variables']


def short_error(err: BaseException) -> str:
  """`Type: first line` of an exception (orbax errors run to pages)."""
  lines = str(err).strip().splitlines()
  first = lines[0] if lines else ''
  if len(first) > 200:
    first = first[:200] + '...'
  return f'{type(err).__name__}: {first}'


def _flat(tree: Any) -> dict[tuple, tuple]:
  """{path: (shape, dtype)} of a saved-metadata or abstract tree, in the
  nested dict/list form orbax saves."""
  flat = ocp.tree.to_flat_dict(
    ocp.tree.serialize_tree(tree, keep_empty_nodes=True)
  )
  return {
    tuple(str(k) for k in path): (tuple(v.shape), str(v.dtype))
    for path, v in flat.items()
    if hasattr(v, 'shape') and hasattr(v, 'dtype')
  }


def tree_differences(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> list[str] | None:
  """How the saved `state` tree of `step` differs from `abstract_state`:
  [] when it is the same, None when its metadata cannot be read (an
  unreadable checkpoint, not a different one)."""
  path = epath.Path(manager.directory) / str(step) / 'state'
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(path)
    saved = _flat(metadata.tree)
  except Exception:  # noqa: BLE001 - unreadable metadata
    return None
  expected = _flat(abstract_state)
  out = []
  for key in sorted(set(saved) | set(expected)):
    name = '/'.join(key)
    if key not in saved:
      out.append(f'not in the checkpoint: {name} {expected[key][0]}')
    elif key not in expected:
      out.append(f'only in the checkpoint: {name} {saved[key][0]}')
    elif saved[key][0] != expected[key][0]:
      out.append(
        f'shape: {name} {saved[key][0]} saved, {expected[key][0]} configured'
      )
  return out


def mismatch_message(directory: str, step: int, differences: list[str]) -> str:
  """A few lines: the first differing leaves, a count, the two ways out."""
  shown = differences[:_MAX_LISTED]
  more = len(differences) - len(shown)
  lines = [
    f'checkpoint step {step} in {directory} does not match the configured '
    f'model/optimizer state ({len(differences)} differing leaves); the '
    'config changed since it was written:',
    *(f'  {d}' for d in shown),
  ]
  if more:
    lines.append(f'  ... and {more} more')
  lines.append(
    'Nothing was changed in the workdir. Either resume with the config the '
    'run was started with (its config.json), or start a new --workdir, with '
    '--config.init_from.path=<this workdir> to carry the weights over.'
  )
  return '\n'.join(lines)
