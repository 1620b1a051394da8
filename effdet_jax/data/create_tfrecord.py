r"""Writes sharded TFRecords in the official EfficientDet layout.

  python -m effdet_jax.data.create_tfrecord --format=coco \
      --annotations=FILE.json --images=DIR --output=PREFIX [--num_shards=N]
  python -m effdet_jax.data.create_tfrecord --format=voc \
      --annotations=DIR_OF_XML --images=DIR [--split=LIST.txt] \
      [--label_map=FILE] --output=PREFIX

Records go to PREFIX-00000-of-0000N.tfrecord, round-robin as the official
converters do, with their feature keys and encodings
(`efficientdet/dataset/create_coco_tfrecord.py: create_tf_example` and
`_create_tf_record_from_coco_annotations`;
`efficientdet/dataset/create_pascal_tfrecord.py: dict_to_tf_example` and
`main`), so the official dataloader reads ours and we read theirs. Beside
them, named so that the official shard glob `PREFIX*` (the official
README's `--validation_file_pattern=tfrecord/val*`) matches only the
records: DIR/label_map.BASE.json ({id: name}) for PREFIX = DIR/BASE and,
for VOC, the official DIR/json_BASE.json COCO annotations for evaluation.
A BASE that those names would start with (`label_map`, `json`, ...) is
refused before anything is written. Annotations the
official COCO converter skips (w or h <= 0, beyond the image) are skipped
and counted; an unreadable or missing image is skipped and counted (the
official tool would crash); images without annotations are kept. A VOC
XML file that cannot be parsed (truncated, corrupt, a size that is not a
number) is skipped with a warning naming the file and the error, and
counted as `corrupt_xml` in the summary printed at the end; when no XML
file can be parsed the conversion stops with an error. `--strict` makes
any bad image or XML file an error instead.
"""

from __future__ import annotations

import collections
import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import PIL.Image
import tensorflow as tf
import tqdm
from absl import app, flags, logging

from effdet_jax import files
from effdet_jax.data import label_maps, tfrecord_format

Skipped = collections.Counter


def _load_image(path: str, skipped: Skipped, strict: bool):
  """(bytes, format) or None if missing / undecodable (counted)."""
  try:
    encoded = files.read_bytes(path)
  except OSError:
    if strict:
      raise
    skipped['missing_file'] += 1
    logging.warning('missing image %s', path)
    return None
  try:
    with PIL.Image.open(io.BytesIO(encoded)) as image:
      image.load()  # a full decode: catches truncated / corrupt files
      fmt = (image.format or 'jpeg').lower()
  except (OSError, SyntaxError, ValueError) as e:
    if strict:
      raise ValueError(f'corrupt image {path}: {e}') from e
    skipped['corrupt_image'] += 1
    logging.warning('corrupt image %s: %s', path, e)
    return None
  return encoded, fmt


def coco_examples(
  annotations: str, images_dir: str, skipped: Skipped, strict: bool = False
) -> Iterator[tf.train.Example]:
  """One official-layout record per json image, in json order."""
  coco = files.read_json(annotations)
  names = {c['id']: c['name'] for c in coco['categories']}
  by_image = collections.defaultdict(list)
  for ann in coco.get('annotations', []):
    by_image[ann['image_id']].append(ann)
  for image in tqdm.tqdm(coco['images'], desc='coco -> tfrecord'):
    loaded = _load_image(
      files.join(images_dir, image['file_name']), skipped, strict
    )
    if loaded is None:
      continue
    width, height = image['width'], image['height']
    objects = None
    anns = by_image.get(image['id'], [])
    if not anns:
      skipped['images_without_annotations (kept)'] += 1
    else:
      objects = collections.defaultdict(list)
      for ann in anns:
        x, y, w, h = ann['bbox']
        if w <= 0 or h <= 0:
          skipped['zero_area_box'] += 1
          continue
        if x + w > width or y + h > height:
          skipped['box_outside_image'] += 1
          continue
        objects['xmin'].append(float(x) / width)
        objects['xmax'].append(float(x + w) / width)
        objects['ymin'].append(float(y) / height)
        objects['ymax'].append(float(y + h) / height)
        objects['is_crowd'].append(ann['iscrowd'])
        objects['label'].append(int(ann['category_id']))
        objects['text'].append(names[ann['category_id']].encode('utf8'))
        objects['area'].append(ann['area'])
    yield tfrecord_format.make_example(
      encoded=loaded[0],
      image_format='jpeg' if loaded[1] in ('jpeg', 'mpo') else loaded[1],
      filename=image['file_name'],
      source_id=str(image['id']),
      height=height,
      width=width,
      objects=objects,
    )


def _text(node, path, default=''):
  found = node.find(path)
  return found.text.strip() if found is not None and found.text else default


def _read_voc_xml(path: str, stem: str) -> dict:
  """The fields we use of one VOC XML file, all parsed here so that a
  corrupt file raises (ET.ParseError, ValueError) before any of it is
  written."""
  root = ET.fromstring(files.read_bytes(path))
  objects = [
    dict(
      name=_text(obj, 'name'),
      box=[
        float(_text(obj, 'bndbox/' + k))
        for k in ('xmin', 'ymin', 'xmax', 'ymax')
      ],
      difficult=int(_text(obj, 'difficult', '0')),
      truncated=int(_text(obj, 'truncated', '0')),
      pose=_text(obj, 'pose', ''),
    )
    for obj in root.findall('object')
  ]
  return dict(
    filename=_text(root, 'filename', stem + '.jpg'),
    width=int(_text(root, 'size/width')),
    height=int(_text(root, 'size/height')),
    objects=objects,
  )


def voc_examples(
  xml_dir: str,
  images_dir: str,
  split: str | None,
  name_to_id: dict[str, int],
  skipped: Skipped,
  coco_json: dict,
  strict: bool = False,
) -> Iterator[tf.train.Example]:
  """Official `create_pascal_tfrecord` records; ids 1.. in list order."""
  if split:
    lines = files.read_text(split).splitlines()
    stems = [line.split()[0] for line in lines if line.strip()]
  else:
    stems = [p[:-4] for p in files.listdir(xml_dir) if p.endswith('.xml')]
  if not stems:
    raise ValueError(f'no VOC annotations (*.xml) to convert in {xml_dir}')
  image_id = parsed = 0
  for stem in tqdm.tqdm(stems, desc='voc -> tfrecord'):
    xml_path = files.join(xml_dir, stem + '.xml')
    try:
      ann = _read_voc_xml(xml_path, stem)
    except (ET.ParseError, ValueError) as e:
      # One bad file must not cost the whole conversion (nor go unnamed).
      if strict:
        raise ValueError(f'corrupt VOC annotation {xml_path}: {e}') from e
      skipped['corrupt_xml'] += 1
      logging.warning('skipping corrupt VOC annotation %s: %s', xml_path, e)
      continue
    parsed += 1
    filename, width, height = ann['filename'], ann['width'], ann['height']
    loaded = _load_image(files.join(images_dir, filename), skipped, strict)
    if loaded is None:
      continue
    image_id += 1
    coco_json['images'].append(
      dict(file_name=filename, height=height, width=width, id=image_id)
    )
    objects = collections.defaultdict(list)
    for obj in ann['objects']:
      name = obj['name']
      if name not in name_to_id:
        skipped['unknown_class'] += 1
        continue
      xmin, ymin, xmax, ymax = obj['box']
      if xmax <= xmin or ymax <= ymin:
        skipped['zero_area_box'] += 1
        continue
      if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
        skipped['box_outside_image'] += 1
        continue
      objects['xmin'].append(xmin / width)
      objects['ymin'].append(ymin / height)
      objects['xmax'].append(xmax / width)
      objects['ymax'].append(ymax / height)
      objects['area'].append(
        (objects['xmax'][-1] - objects['xmin'][-1])
        * (objects['ymax'][-1] - objects['ymin'][-1])
      )
      objects['text'].append(name.encode('utf8'))
      objects['label'].append(name_to_id[name])
      objects['difficult'].append(obj['difficult'])
      objects['truncated'].append(obj['truncated'])
      objects['view'].append(obj['pose'].encode('utf8'))
      w, h = int(xmax) - int(xmin), int(ymax) - int(ymin)
      coco_json['annotations'].append(
        dict(
          area=w * h,
          iscrowd=0,
          image_id=image_id,
          bbox=[int(xmin), int(ymin), w, h],
          category_id=name_to_id[name],
          id=len(coco_json['annotations']) + 1,
          ignore=0,
          segmentation=[],
        )
      )
    if not objects['label']:
      skipped['images_without_annotations (kept)'] += 1
    yield tfrecord_format.make_example(
      encoded=loaded[0],
      image_format='jpeg' if loaded[1] in ('jpeg', 'mpo') else loaded[1],
      filename=filename,
      source_id=str(image_id),
      height=height,
      width=width,
      # The official pascal converter always writes the object keys.
      objects=objects,
    )
  if not parsed:
    raise ValueError(
      f'none of the {len(stems)} VOC annotations in {xml_dir} could be '
      'parsed (see the warnings above): is --annotations the folder of '
      'Pascal VOC XML files?'
    )


def write_shards(
  examples: Iterator[tf.train.Example], output: str, num_shards: int
) -> tuple[list[str], int]:
  """Round-robin over PREFIX-%05d-of-%05d.tfrecord; (paths, count)."""
  files.makedirs(os.path.dirname(files.absolute(output)))
  paths = [
    f'{output}-{i:05d}-of-{num_shards:05d}.tfrecord' for i in range(num_shards)
  ]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  count = 0
  try:
    for i, example in enumerate(examples):
      writers[i % num_shards].write(example.SerializeToString())
      count += 1
  finally:
    for writer in writers:
      writer.close()
  return paths, count


def check_side_files(output: str, side_files: list[str]) -> None:
  """Raises ValueError when a file written beside the records would match
  the shards' glob `PREFIX*` (official readers would read it as a record
  and fail: `DataLossError: corrupted record at 0`)."""
  base = os.path.basename(output)
  clash = [p for p in side_files if os.path.basename(p).startswith(base)]
  if clash:
    raise ValueError(
      f'--output={output}: {clash} would match the shard pattern '
      f'{output}* and break readers of it; choose another output name'
    )


def convert(
  fmt: str,
  annotations: str,
  images: str,
  output: str,
  num_shards: int = 32,
  split: str | None = None,
  label_map: str | None = None,
  strict: bool = False,
) -> Skipped:
  """Writes the records and the label map; returns the skip counts."""
  label_map_path = label_maps.records_file(output)
  json_path = files.join(
    os.path.dirname(files.absolute(output)),
    'json_' + os.path.basename(output) + '.json',
  )
  check_side_files(output, [label_map_path, json_path])
  skipped: Skipped = collections.Counter()
  if fmt == 'coco':
    categories = files.read_json(annotations)['categories']
    names = {c['id']: c['name'] for c in categories}
    examples = coco_examples(annotations, images, skipped, strict)
    paths, count = write_shards(examples, output, num_shards)
  elif fmt == 'voc':
    names = label_maps.load(label_map) if label_map else dict(label_maps.VOC)
    name_to_id = {v: k for k, v in names.items()}
    coco_json = dict(
      images=[],
      type='instances',
      annotations=[],
      categories=[
        dict(supercategory='none', id=k, name=v) for k, v in names.items()
      ],
    )
    examples = voc_examples(
      annotations, images, split, name_to_id, skipped, coco_json, strict
    )
    paths, count = write_shards(examples, output, num_shards)
    files.write_json(json_path, coco_json)
  else:
    raise ValueError(f"--format must be 'coco' or 'voc', not {fmt!r}")
  label_maps.save(label_map_path, names)
  summary = ', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))
  print(f'wrote {count} records to {len(paths)} shards {output}-*')
  print(f'skipped / noted: {summary or "nothing"}')
  return skipped


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define the same flag twice)."""
  flags.DEFINE_enum('format', 'coco', ['coco', 'voc'], 'annotation format')
  flags.DEFINE_string('annotations', None, 'COCO json, or dir of VOC xml')
  flags.DEFINE_string('images', None, 'image folder')
  flags.DEFINE_string('output', None, 'output prefix')
  flags.DEFINE_integer('num_shards', 32, 'number of shards (official: 32)')
  flags.DEFINE_string('split', None, 'VOC: file of image stems to convert')
  flags.DEFINE_string('label_map', None, 'VOC: json label map (name<->id)')
  flags.DEFINE_bool(
    'strict', False, 'raise on a bad image or XML file instead of skip'
  )
  flags.mark_flags_as_required(['annotations', 'images', 'output'])


def main(argv):
  del argv
  f = flags.FLAGS
  convert(
    f.format,
    f.annotations,
    f.images,
    f.output,
    f.num_shards,
    f.split,
    f.label_map,
    f.strict,
  )


if __name__ == '__main__':
  _define_flags()
  app.run(main)
