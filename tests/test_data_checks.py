"""Bad input is counted and skipped (or, strict, raised naming the record);
images without annotations are kept and counted."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from conftest import shared_path

from effdet_jax.data import checks, create_tfrecord, pipeline, testing

GOOD = '000000000009.jpg'  # 640 x 480 (shared data/coco128)


def _good():
  return shared_path('data', 'coco128', 'images', GOOD)


@pytest.fixture()
def bad_dataset(tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  shutil.copy(_good(), images / 'good.jpg')
  shutil.copy(_good(), images / 'empty.jpg')
  data = _good().read_bytes()
  (images / 'corrupt.jpg').write_bytes(data[:200] + b'\x00' * 500)
  (images / 'garbage.jpg').write_bytes(b'not an image at all')
  im = lambda i, name: dict(id=i, file_name=name, height=480, width=640)  # noqa: E731
  ann = lambda i, img, bbox: dict(  # noqa: E731
    id=i, image_id=img, bbox=bbox, category_id=1, iscrowd=0, area=10.0
  )
  coco = dict(
    images=[
      im(1, 'good.jpg'),
      im(2, 'corrupt.jpg'),
      im(3, 'missing.jpg'),
      im(4, 'empty.jpg'),
      im(5, 'garbage.jpg'),
    ],
    annotations=[
      ann(1, 1, [10, 20, 100, 50]),
      ann(2, 1, [600, 20, 100, 50]),  # beyond the right edge
      ann(3, 1, [30, 30, 0, 0]),  # zero area
      ann(4, 2, [10, 10, 20, 20]),
      ann(5, 3, [10, 10, 20, 20]),
      ann(6, 5, [10, 10, 20, 20]),
    ],
    categories=[dict(id=1, name='thing')],
  )
  path = tmp_path / 'annotations.json'
  path.write_text(json.dumps(coco))
  return path, images


def _eval(path, images, strict=False):
  config = testing.small_config(
    source='coco_json',
    eval_json=str(path),
    eval_images=str(images),
    strict=strict,
  )
  stats = checks.DataStats(strict=strict)
  batches = list(pipeline.eval_dataset(config, stats=stats).as_numpy_iterator())
  return batches, stats


def test_bad_input_is_counted_and_skipped(bad_dataset):
  batches, stats = _eval(*bad_dataset)
  ids = np.concatenate([b['image_id'][b['valid']] for b in batches])
  assert sorted(ids) == [1, 4]  # the good image and the negative example
  assert stats.counts == {
    'corrupt_image': 2,
    'missing_file': 1,
    'box_outside_image': 1,
    'zero_area_box': 1,
    'no_annotations': 1,
  }
  good = next(b for b in batches if 1 in b['image_id'])
  i = list(good['image_id']).index(1)
  assert (good['classes'][i] > 0).sum() == 1  # only the valid box is left
  empty_i = [b for b in batches if 4 in b['image_id']][0]
  j = list(empty_i['image_id']).index(4)
  assert np.all(empty_i['classes'][j] == -1)


@pytest.mark.parametrize(
  'drop, reason, name',
  [
    ([3], 'box_outside_image', 'good.jpg'),
    ([2, 3], 'corrupt_image', 'corrupt.jpg'),
    ([2, 3, 4], 'missing_file', 'missing.jpg'),
  ],
)
def test_strict_mode_names_the_record(bad_dataset, drop, reason, name):
  path, images = bad_dataset
  coco = json.loads(path.read_text())
  coco['annotations'] = [a for a in coco['annotations'] if a['id'] not in drop]
  if reason != 'box_outside_image':  # put the bad image first
    coco['images'] = [i for i in coco['images'] if i['file_name'] == name]
  path.write_text(json.dumps(coco))
  with pytest.raises(tf.errors.OpError, match=f'{reason} in record {name}'):
    _eval(path, images, strict=True)


def test_corrupt_record_in_tfrecord_is_skipped(bad_dataset, tmp_path):
  path, images = bad_dataset
  skipped = create_tfrecord.convert(
    'coco', str(path), str(images), str(tmp_path / 'r'), num_shards=1
  )
  # The tool itself skips unreadable images and the annotations the
  # official converter skips, and reports them.
  assert skipped['corrupt_image'] == 2 and skipped['missing_file'] == 1
  assert skipped['box_outside_image'] == 1 and skipped['zero_area_box'] == 1
  # A record whose bytes are corrupt (written by some other tool).
  with tf.io.TFRecordWriter(str(tmp_path / 'r-bad.tfrecord')) as w:
    for record in tf.data.TFRecordDataset(
      str(tmp_path / 'r-00000-of-00001.tfrecord')
    ):
      ex = tf.train.Example.FromString(record.numpy())
      ex.features.feature['image/encoded'].bytes_list.value[0] = b'\xff\xd8junk'
      w.write(ex.SerializeToString())
      break
  config = testing.small_config(
    source='tfrecord', eval_pattern=str(tmp_path / 'r-*.tfrecord')
  )
  stats = checks.DataStats()
  batches = list(pipeline.eval_dataset(config, stats=stats).as_numpy_iterator())
  ids = np.concatenate([b['image_id'][b['valid']] for b in batches])
  assert sorted(ids) == [1, 4]
  assert stats.counts['corrupt_image'] == 1
  assert stats.counts['no_annotations'] == 1


def test_too_many_boxes_are_cut_and_counted(tmp_path):
  shutil.copy(_good(), tmp_path / 'a.jpg')
  anns = [
    dict(id=i, image_id=1, bbox=[i, i, 5, 5], category_id=1, iscrowd=0, area=25)
    for i in range(1, 8)
  ]
  coco = dict(
    images=[dict(id=1, file_name='a.jpg', height=480, width=640)],
    annotations=anns,
    categories=[dict(id=1, name='x')],
  )
  (tmp_path / 'a.json').write_text(json.dumps(coco))
  config = testing.small_config(
    source='coco_json',
    eval_json=str(tmp_path / 'a.json'),
    eval_images=str(tmp_path),
    max_instances_per_image=5,
  )
  stats = checks.DataStats()
  batch = next(pipeline.eval_dataset(config, stats=stats).as_numpy_iterator())
  assert (
    batch['classes'].shape == (2, 5) and (batch['classes'][0] > 0).sum() == 5
  )
  assert stats.counts['too_many_boxes'] == 2


def _voc_xml(stem, width='64'):
  return (
    f'<annotation><filename>{stem}.png</filename><size><width>{width}'
    '</width><height>48</height><depth>3</depth></size><object><name>cell'
    '</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin>'
    '<xmax>30</xmax><ymax>20</ymax></bndbox></object></annotation>'
  )


@pytest.fixture()
def voc_dataset(tmp_path):
  """A VOC-form folder: a.xml and b.xml are fine, c.xml is truncated,
  d.xml has a width that is not a number."""
  xml, images = tmp_path / 'xml', tmp_path / 'images'
  xml.mkdir()
  images.mkdir()
  for stem in 'abcd':
    PIL.Image.new('RGB', (64, 48), (90, 120, 30)).save(images / f'{stem}.png')
  (xml / 'a.xml').write_text(_voc_xml('a'))
  (xml / 'b.xml').write_text(_voc_xml('b'))
  (xml / 'c.xml').write_text(_voc_xml('c')[:70])
  (xml / 'd.xml').write_text(_voc_xml('d', width='sixty-four'))
  label_map = tmp_path / 'map.json'
  label_map.write_text('{"cell": 1}')
  return xml, images, label_map


def _voc_convert(xml, images, label_map, output, **kw):
  return create_tfrecord.convert(
    'voc',
    str(xml),
    str(images),
    str(output),
    num_shards=1,
    label_map=str(label_map),
    **kw,
  )


def test_voc_corrupt_xml_is_skipped_and_named(
  voc_dataset, tmp_path, caplog, capsys
):
  xml, images, label_map = voc_dataset
  skipped = _voc_convert(xml, images, label_map, tmp_path / 'r')
  assert skipped['corrupt_xml'] == 2
  records = list(
    tf.data.TFRecordDataset(str(tmp_path / 'r-00000-of-00001.tfrecord'))
  )
  names = [
    tf.train.Example.FromString(r.numpy())
    .features.feature['image/filename']
    .bytes_list.value[0]
    for r in records
  ]
  assert names == [b'a.png', b'b.png']
  coco = json.loads((tmp_path / 'json_r.json').read_text())
  assert [im['file_name'] for im in coco['images']] == ['a.png', 'b.png']
  assert len(coco['annotations']) == 2  # nothing of c or d
  warnings = [r.getMessage() for r in caplog.records]
  for stem, error in (('c', 'no element found'), ('d', 'sixty-four')):
    assert any(
      str(xml / f'{stem}.xml') in w and error in w for w in warnings
    ), warnings
  assert 'corrupt_xml: 2' in capsys.readouterr().out  # the final summary


def test_voc_corrupt_xml_strict_or_all_bad_fails(voc_dataset, tmp_path):
  xml, images, label_map = voc_dataset
  with pytest.raises(ValueError, match='corrupt VOC annotation .*c.xml'):
    _voc_convert(xml, images, label_map, tmp_path / 's', strict=True)
  for stem in 'ab':
    (xml / f'{stem}.xml').unlink()
  with pytest.raises(
    ValueError, match=f'none of the 2 VOC annotations in {xml}'
  ):
    _voc_convert(xml, images, label_map, tmp_path / 'r')
  for stem in 'cd':
    (xml / f'{stem}.xml').unlink()
  with pytest.raises(ValueError, match='no VOC annotations'):
    _voc_convert(xml, images, label_map, tmp_path / 'r')
