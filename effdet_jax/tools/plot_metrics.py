"""`python -m effdet_jax.tools.plot_metrics --workdir=W --output=loss.png`

Plots training curves from `W/metrics.jsonl` into a PNG with Pillow only
(no plotting library dependency): one panel per metric.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from effdet_jax import files
from effdet_jax.runtime import metrics as metrics_lib


def plot(rows, keys, output, width=640, panel=200):
  img = Image.new('RGB', (width, panel * len(keys)), 'white')
  draw = ImageDraw.Draw(img)
  for i, key in enumerate(keys):
    pts = [(r['step'], r[key]) for r in rows if key in r]
    top = i * panel
    draw.text((8, top + 4), key, fill='black')
    if len(pts) < 2:
      continue
    steps, vals = np.array(pts).T
    x0, x1, y0, y1 = 50, width - 10, top + 20, top + panel - 25
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo or 1.0
    xs = x0 + (steps - steps.min()) / max(np.ptp(steps), 1) * (x1 - x0)
    ys = y1 - (vals - lo) / span * (y1 - y0)
    draw.rectangle((x0, y0, x1, y1), outline='gray')
    draw.line(
      list(zip(xs.tolist(), ys.tolist(), strict=True)), fill='blue', width=2
    )
    draw.text((2, y0), f'{hi:.3g}', fill='black')
    draw.text((2, y1 - 10), f'{lo:.3g}', fill='black')
    draw.text((x1 - 60, y1 + 4), f'step {int(steps.max())}', fill='black')
  # The format from the name, as PIL's save(path) does; `output` may be a URL.
  ext = os.path.splitext(output)[1].lower()
  with files.open(output, 'wb') as f:
    img.save(f, format=Image.registered_extensions().get(ext, 'PNG'))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--output', required=True)
  p.add_argument('--keys', default='det_loss,cls_loss,box_loss,eval/AP')
  a = p.parse_args()
  rows = metrics_lib.read_metrics(a.workdir)
  plot(rows, a.keys.split(','), a.output)
  print(f'wrote {a.output}')


if __name__ == '__main__':
  main()
