"""Atomic whole-file writes: a reader racing a writer (every process checks
the workdir's label map while process 0 rewrites it on a restart) sees the
old file or the new one, never a truncated one."""

import os
import threading

from effdet_jax import files
from effdet_jax.data import label_maps


def test_write_text_replaces_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / 'sub' / 'a.json')
  files.write_text(path, 'one')
  files.write_text(path, 'two')
  assert open(path).read() == 'two'
  assert os.listdir(tmp_path / 'sub') == ['a.json']


def test_reader_never_sees_a_partial_label_map(tmp_path):
  workdir = str(tmp_path)
  maps = [
    label_maps.ClassMap.identity(label_maps.COCO),
    label_maps.ClassMap.identity({1: 'cell', 2: 'platelet'}),
  ]
  label_maps.save_workdir(workdir, maps[0])
  stop = threading.Event()

  def writer():
    i = 0
    while not stop.is_set():
      i += 1
      label_maps.save_workdir(workdir, maps[i % 2])

  thread = threading.Thread(target=writer)
  thread.start()
  try:
    seen = [label_maps.load_workdir(workdir) for _ in range(3000)]
  finally:
    stop.set()
    thread.join()
  assert all(m in maps for m in seen)
