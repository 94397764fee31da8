"""`data_prep build` on real faces: sources, bad input, determinism, atomicity, scale-out."""

import csv
import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_prep import build, items, readers
from ssfer_jax.errors import DatasetError
from ssfer_jax.input import records

CLASSES = ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
FAST = build.Config(size=32, crop="none", detector="none")


def demo_rows(demo_data_dir, n):
  """`n` rows of the demo labels.csv spread over the file (so: mixed case, grey and colour)."""
  with open(demo_data_dir / "labels.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  return [rows[i] for i in np.linspace(0, len(rows) - 1, n).astype(int)]


def write_csv(path, rows, columns=("user.id", "image", "emotion")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows(rows)
  return str(path)


def demo_source(demo_data_dir, tmp_path, n, name="demo"):
  rows = [(r["user.id"], r["image"], r["emotion"]) for r in demo_rows(demo_data_dir, n)]
  return readers.CsvSource(name=name, path=write_csv(tmp_path / f"{name}.csv", rows),
                           root=str(demo_data_dir / "images"))


def tree_bytes(root) -> dict:
  out = {}
  for dirpath, _, files in os.walk(root):
    for fn in files:
      p = os.path.join(dirpath, fn)
      out[os.path.relpath(p, root)] = open(p, "rb").read()
  return out


def read_shards(out):
  manifest = records.load_manifest(str(out))
  recs = []
  for path in records.shard_paths(str(out), manifest):
    reader = ArrayRecordReader(path)
    recs += [records.decode(raw) for raw in reader.read(list(range(reader.num_records())))]
  return manifest, recs


# ---- sources and the real data's mess ----

def test_csv_source_normalises_labels_and_collapses_duplicate_rows(demo_data_dir, tmp_path):
  rows = demo_rows(demo_data_dir, 30)
  table = [(r["user.id"], r["image"], r["emotion"]) for r in rows]
  table += [("JN721", rows[3]["image"], rows[3]["emotion"].upper()),  # repeated, other case
            ("x", rows[5]["image"], " " + rows[5]["emotion"] + " ")]
  assert any(r["emotion"] != r["emotion"].lower() for r in rows)   # the demo's mixed case
  src = readers.CsvSource("demo", write_csv(tmp_path / "l.csv", table),
                          root=str(demo_data_dir / "images"))
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert m["classes"] == sorted({r["emotion"].lower() for r in rows})
  s = m["sources"]["demo"]
  assert (s["read"], s["written"], s["skipped"], s["duplicate_rows"]) == (30, 30, 0, 2)
  _, recs = read_shards(tmp_path / "out")
  label = {r["image"]: r["emotion"].lower() for r in rows}
  assert [rec["id"] for rec in recs] == sorted(f"demo/{img}" for img in label)
  for rec in recs:
    assert m["classes"][rec["label"]] == label[rec["id"].split("/", 1)[1]]
    assert rec["source"] == "demo" and rec["face_found"] is False and rec["box"] == [0, 0, 1, 1]


def test_class_order_and_aliases(demo_data_dir, tmp_path):
  rows = demo_rows(demo_data_dir, 12)
  table = [("u", r["image"], r["emotion"]) for r in rows[:10]]
  table += [("u", rows[10]["image"], "Happy"), ("u", rows[11]["image"], "glad ")]
  src = readers.CsvSource("demo", write_csv(tmp_path / "l.csv", table),
                          root=str(demo_data_dir / "images"))
  order = tuple(reversed(CLASSES))
  cfg = build.Config(size=32, crop="none", detector="none", classes=order,
                     aliases=(("HAPPY", "happiness"), ("glad", "Happiness")))
  m = build.build([src], str(tmp_path / "out"), cfg, workers=1, progress=False)
  assert m["classes"] == list(order) and m["skipped"] == []
  _, recs = read_shards(tmp_path / "out")
  label = {f"demo/{img}": lab.strip().lower() for _, img, lab in table}
  label.update({f"demo/{rows[10]['image']}": "happiness", f"demo/{rows[11]['image']}": "happiness"})
  assert {r["id"]: order[r["label"]] for r in recs} == label


def test_dataset_boxes_from_csv_columns(demo_data_dir, tmp_path):
  rows = demo_rows(demo_data_dir, 3)
  cols = ("image", "emotion", "left", "top", "right", "bottom")
  table = [(rows[0]["image"], "neutral", 10, 20, 50, 70),     # 96x96 image
           (rows[1]["image"], "neutral", "n/a", 0, 10, 10),
           (rows[2]["image"], "neutral", 500, 500, 600, 600)]
  src = readers.parse(["csv", write_csv(tmp_path / "b.csv", table, cols),
                       f"root={demo_data_dir / 'images'}", "box_cols=left,top,right,bottom"])
  cfg = build.Config(size=64, crop="face", margin=1.5, detector="dataset")
  m = build.build([src], str(tmp_path / "out"), cfg, workers=1, progress=False)
  reasons = sorted(sk["reason"].split(":")[0] for sk in m["skipped"])
  assert reasons == ["bad box", "bad box"] and m["num_records"] == 1
  [rec] = read_shards(tmp_path / "out")[1]
  side = 1.5 * 50  # margin x the longer side; the square is centred on the box
  left, top = round(30 - side / 2), round(45 - side / 2)
  want = ((10 - left) / side, (20 - top) / side, (50 - left) / side, (70 - top) / side)
  assert rec["face_found"] and rec["box"] == pytest.approx(want)
  with pytest.raises(DatasetError, match="box_cols="):
    build.build([demo_source(demo_data_dir, tmp_path, 5)], str(tmp_path / "o2"), cfg,
                workers=1, progress=False)


def test_folder_sources_labeled_and_unlabeled(demo_data_dir, tmp_path):
  rows = demo_rows(demo_data_dir, 12)
  lab, unl = tmp_path / "lab", tmp_path / "unl"
  for i, r in enumerate(rows[:8]):
    sub = lab / (["Happiness", "happiness", "NEUTRAL", "neutral"][i % 4])
    sub.mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_data_dir / "images" / r["image"], sub / r["image"])
  shutil.copy(demo_data_dir / "images" / rows[8]["image"], lab / "stray.jpg")
  (lab / ".hidden.jpg").write_bytes(b"ignored")
  for i, r in enumerate(rows[9:]):
    d = unl / "a" / ("b" if i else "")
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_data_dir / "images" / r["image"], d / r["image"])
  srcs = [readers.parse(["folder", str(lab), "labels=subdirs"]),
          readers.parse(["folder", str(unl), "labels=none", "name=web"])]
  m = build.build(srcs, str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert m["classes"] == ["happiness", "neutral"]
  assert m["counts"] == {"happiness": 4, "neutral": 4, "unlabeled": 3}
  assert [sk["reason"].split(" (")[0] for sk in m["skipped"]] == ["not in a class sub-folder"]
  assert m["sources"]["lab"]["read"] == 9 and m["sources"]["web"]["read"] == 3
  _, recs = read_shards(tmp_path / "out")
  for rec in recs:
    if rec["source"] == "web":
      assert rec["label"] == records.UNLABELED and rec["id"].startswith("web/a/")
    else:
      folder = rec["id"].split("/")[1]
      assert m["classes"][rec["label"]] == folder.lower()


def test_folder_source_must_say_how_it_is_labeled(tmp_path):
  with pytest.raises(DatasetError, match="labels=subdirs"):
    readers.parse(["folder", str(tmp_path)])


def test_wrong_csv_columns_fail_naming_file_column_and_columns(demo_data_dir, tmp_path):
  path = write_csv(tmp_path / "bad.csv", [("1", "x.jpg", "anger")], ("user.id", "file", "emotion"))
  src = readers.CsvSource("bad", path, root=str(demo_data_dir / "images"))
  with pytest.raises(DatasetError) as e:
    build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  msg = str(e.value)
  assert path in msg and "'image' not found" in msg and "['user.id', 'file', 'emotion']" in msg
  assert "image_col=" in msg and not (tmp_path / "out").exists()


@pytest.fixture
def messy(demo_data_dir, tmp_path, monkeypatch):
  """A CSV source with every kind of bad input next to good real faces."""
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  rows = demo_rows(demo_data_dir, 20)
  table = []
  for r in rows:
    shutil.copy(demo_data_dir / "images" / r["image"], images_dir / r["image"])
    table.append((r["user.id"], r["image"], r["emotion"]))
  face = (demo_data_dir / "images" / rows[0]["image"]).read_bytes()
  bad = {
      "corrupt.jpg": face[: len(face) // 2],
      "zero.jpg": b"",
      "notes.jpg": b"not an image: a text file with a .jpg name\n" * 10,
      "locked.jpg": face,
      "tiny.jpg": cv2.imencode(".jpg", cv2.resize(cv2.imdecode(np.frombuffer(face, np.uint8), 0),
                                                  (24, 20)))[1].tobytes(),
      "conflict.jpg": face,
      "unknown.jpg": face,
  }
  for name, data in bad.items():
    (images_dir / name).write_bytes(data)
  os.chmod(images_dir / "locked.jpg", 0)
  if os.geteuid() == 0:  # root reads anything: make the permission failure happen anyway
    real_open = open

    def fake_open(path, *a, **kw):
      if str(path).endswith("locked.jpg"):
        raise PermissionError(13, "Permission denied", str(path))
      return real_open(path, *a, **kw)
    monkeypatch.setattr(build, "open", fake_open, raising=False)
  table += [("u", name, "happiness") for name in ("corrupt.jpg", "zero.jpg", "notes.jpg",
                                                   "locked.jpg", "tiny.jpg", "missing.jpg")]
  table += [("u", "conflict.jpg", "happiness"), ("v", "conflict.jpg", "SADNESS"),
            ("u", "unknown.jpg", "Boredom")]
  yield readers.CsvSource("messy", write_csv(tmp_path / "labels.csv", table), root=str(images_dir))
  os.chmod(images_dir / "locked.jpg", 0o644)


EXPECTED_REASONS = {
    "corrupt.jpg": "not a decodable image",
    "zero.jpg": "empty file",
    "notes.jpg": "not a decodable image",
    "locked.jpg": "unreadable: permission denied",
    "tiny.jpg": "too small: 24x20 px",
    "missing.jpg": "missing file",
    "conflict.jpg": "conflicting labels: 'happiness' (CSV line 28); 'sadness' (CSV line 29)",
    "unknown.jpg": "unknown label 'boredom' (known: anger, contempt",
}


def test_bad_inputs_are_skipped_with_reasons_and_counts_reconcile(messy, tmp_path, capsys):
  cfg = build.Config(size=32, crop="none", detector="none", classes=CLASSES)
  m = build.build([messy], str(tmp_path / "out"), cfg, workers=1, progress=False)
  reasons = {sk["id"].split("/", 1)[1]: sk["reason"] for sk in m["skipped"]}
  assert set(reasons) == set(EXPECTED_REASONS)
  for name, reason in EXPECTED_REASONS.items():
    assert reasons[name].startswith(reason), (name, reasons[name])
  s = m["sources"]["messy"]
  assert (s["read"], s["written"], s["skipped"]) == (28, 20, 8)
  # never read: locked, and the three rejected from the listing (missing, conflict, unknown)
  assert s["read"] == s["written"] + s["skipped"] == len(m["inputs_sha256"]) + 4
  assert m["num_records"] == 20 == sum(m["counts"].values())
  summary = build.summary(m)
  assert "skipped 8 input(s)" in summary and "conflicting labels" in summary


def test_cli_build_reports_skips_on_stderr_and_refuses_to_overwrite(demo_data_dir, tmp_path):
  src = demo_source(demo_data_dir, tmp_path, 40)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_prep", "build", "--out", str(out), "--size", "48",
         "--workers", "2", "--source", "csv", src.path, f"root={src.root}", "name=demo"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "records in 1 shard(s)" in run.stderr and "source demo: read 40" in run.stderr
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert again.returncode == 2 and "--overwrite" in again.stderr
  helped = subprocess.run([sys.executable, "-m", "data_prep", "build", "--help"],
                          capture_output=True, text=True, timeout=60)
  assert helped.returncode == 0 and "examples:" in helped.stdout and "--finalize" in helped.stdout


# ---- the output contract ----

@pytest.fixture(scope="module")
def haar_build(demo_data_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("haar")
  src = demo_source(demo_data_dir, tmp, 60)
  cfg = build.Config(size=64, num_shards=2)
  build.build([src], str(tmp / "a"), cfg, workers=1, progress=False)
  return src, cfg, tmp


def test_manifest_ids_and_records_agree(haar_build, demo_data_dir):
  src, cfg, tmp = haar_build
  out = tmp / "a"
  manifest, recs = read_shards(out)
  assert manifest["manifest_sha256"] == records.manifest_digest(manifest)
  for key in ("classes", "counts", "image_size", "detector", "crop", "margin", "jpeg_quality",
              "min_size", "num_shards", "num_records", "skipped", "sources", "shards",
              "inputs_sha256", "ids_sha256", "command", "options"):
    assert key in manifest, key
  assert manifest["num_shards"] == 2 and manifest["image_size"] == 64
  ids = records.load_ids(str(out))
  assert [r["id"] for r in recs] == ids and len(ids) == manifest["num_records"]
  assert hashlib.sha256((out / "ids.txt").read_bytes()).hexdigest() == manifest["ids_sha256"]
  for shard in manifest["shards"]:
    assert items.sha256_file(str(out / shard["file"])) == shard["sha256"]
  some = ids[0].split("/", 1)[1]
  first_input = str(demo_data_dir / "images" / some)
  assert manifest["inputs_sha256"][ids[0]] == items.sha256_file(first_input)
  found = 0
  for r in recs:
    image = cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (64, 64, 3)
    x0, y0, x1, y1 = r["box"]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    found += r["face_found"]
  assert found == manifest["sources"]["demo"]["faces_found"] and found >= 0.8 * len(recs)


def test_same_inputs_give_identical_bytes_whatever_the_worker_count(haar_build):
  src, cfg, tmp = haar_build
  build.build([src], str(tmp / "b"), cfg, workers=2, progress=False)
  a, b = tree_bytes(tmp / "a"), tree_bytes(tmp / "b")
  assert sorted(a) == sorted(b) == ["ids.txt", "manifest.json", records.shard_name(0, 2),
                                    records.shard_name(1, 2)]
  assert a == b


def test_parts_built_separately_then_finalized_equal_the_single_build(haar_build):
  src, cfg, tmp = haar_build
  parts = tmp / "parts"
  for i in (1, 0):
    build.build_part([src], str(parts), i, cfg, workers=1, progress=False)
  build.build_part([src], str(parts), 1, cfg, workers=1, progress=False)  # a retried task
  build.finalize(str(parts), str(tmp / "c"))
  assert tree_bytes(tmp / "c") == tree_bytes(tmp / "a")
  other = build.Config(size=48, num_shards=2)
  build.build_part([src], str(tmp / "mixed"), 0, cfg, workers=1, progress=False)
  with pytest.raises(DatasetError, match=r"parts \[1\] of 2 are missing"):
    build.finalize(str(tmp / "mixed"), str(tmp / "d"))
  build.build_part([src], str(tmp / "mixed"), 1, other, workers=1, progress=False)
  with pytest.raises(DatasetError, match="different options"):
    build.finalize(str(tmp / "mixed"), str(tmp / "d"))
  assert not (tmp / "d").exists()


def test_no_overwrite_without_the_flag(haar_build):
  src, cfg, tmp = haar_build
  before = tree_bytes(tmp / "a")
  with pytest.raises(FileExistsError, match="--overwrite"):
    build.build([src], str(tmp / "a"), cfg, workers=1, progress=False)
  assert tree_bytes(tmp / "a") == before
  build.build([src], str(tmp / "a"), cfg, workers=1, progress=False, overwrite=True)
  assert tree_bytes(tmp / "a") == before
  assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("a.")) == []


# ---- atomicity ----

def _leftovers(parent, name):
  return [p for p in parent.iterdir() if p.name.startswith(name)]


def test_failed_publish_leaves_nothing(demo_data_dir, tmp_path, monkeypatch):
  src = demo_source(demo_data_dir, tmp_path, 20)

  def broken(*args):
    raise OSError("disk full")
  monkeypatch.setattr(build, "_publish", broken)
  with pytest.raises(OSError, match="disk full"):
    build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert _leftovers(tmp_path, "out") == []


def test_failing_worker_leaves_nothing(demo_data_dir, tmp_path, monkeypatch):
  src = demo_source(demo_data_dir, tmp_path, 20)
  real, calls = build._process, []

  def flaky(item):
    calls.append(item)
    if len(calls) == 7:
      raise MemoryError("worker died")
    return real(item)
  monkeypatch.setattr(build, "_process", flaky)
  with pytest.raises(MemoryError):
    build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert _leftovers(tmp_path, "out") == []


def _children(pid: int) -> list[int]:
  out = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          out.append(int(entry))
    except (OSError, IndexError, ValueError):
      pass
  return out


def test_killed_build_leaves_nothing_that_looks_complete_and_no_workers(demo_data_dir, tmp_path):
  src = demo_source(demo_data_dir, tmp_path, 300)
  out = tmp_path / "out"
  proc = subprocess.Popen(
      [sys.executable, "-m", "data_prep", "build", "--out", str(out), "--size", "64",
       "--workers", "2", "--no-progress", "--source", "csv", src.path, f"root={src.root}"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while not _leftovers(tmp_path, "out.partial-") and time.time() < deadline:
    time.sleep(0.02)
  time.sleep(0.3)
  assert proc.poll() is None, "the build finished before it could be killed"
  workers = _children(proc.pid)
  assert workers, "no pool workers seen"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not out.exists()
  [staging] = _leftovers(tmp_path, "out.partial-")
  assert not (staging / records.MANIFEST).exists()
  # Orphaned pool workers die with the build (they used to block on its queue forever).
  deadline = time.time() + 10
  while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
    time.sleep(0.1)
  alive = [w for w in workers if os.path.exists(f"/proc/{w}")
           and open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
  assert not alive, alive


# ---- TFDS (array_record, no TensorFlow) ----

def test_tfds_array_record_source_is_read_as_unlabeled(demo_data_dir, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  faces_ = [demo_data_dir / "images" / r["image"] for r in demo_rows(demo_data_dir, 6)]

  class TinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, p in enumerate(faces_):
        yield i, {"image": images_jpeg(p)}

  def images_jpeg(p):
    return cv2.imencode(".jpg", cv2.imread(str(p), cv2.IMREAD_COLOR))[1].tobytes()

  # A one-part module name: tfds looks for a dotted module's (here tests.*) checksums as
  # package resources, through importlib_resources, which its wheel does not require.
  TinyFaces.__module__ = "tiny_faces"

  data_dir = tmp_path / "tfds"
  TinyFaces(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  src = readers.parse(["tfds", "tiny_faces", f"data_dir={data_dir}", "split=train", "name=tf"])
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert m["counts"] == {"unlabeled": 6} and m["classes"] == []
  _, recs = read_shards(tmp_path / "out")
  assert [r["id"] for r in recs] == [f"tf/train/{i:09d}" for i in range(6)]
  assert all(r["label"] == records.UNLABELED for r in recs)
  refs = [cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (32, 32), interpolation=cv2.INTER_AREA)
          for p in faces_]
  for r in recs:  # TFDS shuffles the order; each record is one of the faces (JPEG twice over)
    image = cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert min(np.abs(image - ref).mean() for ref in refs) < 8


# ---- Odd inputs (docs/RELIABILITY.md) ----

def test_odd_file_names_round_trip_and_non_files_are_skipped(demo_data_dir, tmp_path):
  from data_prep import split as split_lib
  rows = demo_rows(demo_data_dir, 4)
  tree = tmp_path / "tree"
  tree.mkdir()
  names = ["plain.jpg", "line\u2028sep.jpg", "form\x0cfeed.jpg", "para\u2029graph.jpg"]
  for r, name in zip(rows, names):
    shutil.copy(demo_data_dir / "images" / r["image"], tree / name)
  os.mkfifo(tree / "fifo.jpg")   # read naively, it blocks the build forever
  bad = os.path.join(os.fsencode(tree), b"latin\xe9.jpg")   # not UTF-8
  shutil.copy(demo_data_dir / "images" / rows[0]["image"], bad)
  src = readers.parse(["folder", str(tree), "labels=none", "name=odd"])
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  reasons = {sk["id"]: sk["reason"] for sk in m["skipped"]}
  assert reasons["odd/fifo.jpg"].startswith("not a regular file")
  [utf8] = [r for i, r in reasons.items() if i.startswith("odd/latin")]
  assert utf8.startswith("bad file name: not valid UTF-8")
  ids = records.load_ids(str(tmp_path / "out"))
  assert sorted(ids) == sorted(f"odd/{n}" for n in names)
  _, recs = read_shards(tmp_path / "out")
  assert [r["id"] for r in recs] == ids     # ids.txt matches the shards, record for record
  assert len(split_lib.read_records(str(tmp_path / "out"))) == 4   # the project reads it back


def test_csv_edge_cases_are_named(demo_data_dir, tmp_path):
  rows = demo_rows(demo_data_dir, 3)
  absolute = str(demo_data_dir / "images" / rows[0]["image"])
  path = write_csv(tmp_path / "edge.csv", [("u", absolute, rows[0]["emotion"]),
                                           ("u", "", rows[1]["emotion"]),
                                           ("u", rows[2]["image"], rows[2]["emotion"])])
  src = readers.CsvSource(name="edge", path=path, root=str(tmp_path / "elsewhere"))
  items = {it.id: it for it in src.items({})}
  [abs_item] = [it for it in items.values() if it.path == absolute]
  assert abs_item.skip is None                     # an absolute path is used as it is
  [empty] = [it for it in items.values() if it.skip and "empty image cell" in it.skip]
  assert "CSV line 3" in empty.skip
  header_only = write_csv(tmp_path / "empty.csv", [])
  with pytest.raises(DatasetError, match="no data rows"):
    readers.CsvSource(name="e", path=header_only).items({})


def test_overwrite_replaces_datasets_only(demo_data_dir, tmp_path):
  src = demo_source(demo_data_dir, tmp_path, 4)
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a dataset"):
    build.build([src], str(precious), FAST, workers=1, progress=False, overwrite=True)
  assert (precious / "notes.txt").read_text() == "keep me"
  out = tmp_path / "out"
  build.build([src], str(out), FAST, workers=1, progress=False)
  build.build([src], str(out), FAST, workers=1, progress=False, overwrite=True)   # a dataset
  empty = tmp_path / "empty"
  empty.mkdir()
  build.build([src], str(empty), FAST, workers=1, progress=False, overwrite=True)
  assert (empty / records.MANIFEST).exists()


def test_corrupt_jpeg_data_is_skipped_or_kept_flagged(demo_data_dir, tmp_path, capfd):
  rows = demo_rows(demo_data_dir, 3)
  tree = tmp_path / "tree"
  tree.mkdir()
  for r in rows:
    shutil.copy(demo_data_dir / "images" / r["image"], tree / r["image"])
  smeared = tree / rows[1]["image"]
  raw = bytearray(smeared.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 50] = np.random.default_rng(0).integers(0, 256, 50, dtype=np.uint8).tobytes()
  smeared.write_bytes(bytes(raw))
  src = readers.parse(["folder", str(tree), "labels=none", "name=t"])
  m = build.build([src], str(tmp_path / "skip"), FAST, workers=1, progress=False)
  [sk] = m["skipped"]
  assert sk["id"] == f"t/{rows[1]['image']}" and sk["reason"].startswith("corrupt JPEG data")
  assert m["num_records"] == 2 and m["flagged"] == []
  assert "Corrupt JPEG data" not in capfd.readouterr().err   # attributed, not leaked
  keep = dataclasses.replace(FAST, keep_corrupt=True)
  m = build.build([src], str(tmp_path / "keep"), keep, workers=1, progress=False)
  assert m["num_records"] == 3 and m["skipped"] == []
  [fl] = m["flagged"]
  assert fl["id"] == f"t/{rows[1]['image']}" and "premature end of data segment" in fl["reason"]
  assert "--keep-corrupt" in m["command"]
