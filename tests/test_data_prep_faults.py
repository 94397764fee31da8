"""`data_prep` faults, round two: symlinked folders, huge-header images, malformed CSVs, the
CSV reader's quiet changes, and the message for a build that was deleted."""

import csv
import os
import pathlib
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from data_prep import build, items, readers, split
from ssfer_jax.errors import DatasetError
from ssfer_jax.input import records

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = build.Config(size=32, crop="none", detector="none")


def faces(demo_data_dir, n):
  """The first `n` demo faces' paths (real JPEGs, 96 px)."""
  return sorted((demo_data_dir / "images").glob("*.jpg"))[:n]


def write_csv(path, rows, columns=("image", "emotion")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows(rows)
  return str(path)


def cli_build(*args):
  return subprocess.run([sys.executable, "-m", "data_prep", "build", "--no-progress",
                         "--workers", "1", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


# ---- 1. symbolic links in a folder source ----

def test_symlinked_class_folder_is_built_and_links_not_followed_are_listed(demo_data_dir,
                                                                           tmp_path):
  jpgs = faces(demo_data_dir, 6)
  tree, store = tmp_path / "tree", tmp_path / "store"
  (tree / "happiness").mkdir(parents=True)
  (store / "sad").mkdir(parents=True)
  for p in jpgs[:2]:
    shutil.copy(p, tree / "happiness" / p.name)
  for p in jpgs[2:5]:
    shutil.copy(p, store / "sad" / p.name)
  shutil.copy(jpgs[5], store / "single.jpg")
  os.symlink(store / "sad", tree / "sadness")            # a whole class behind a link
  os.symlink(store / "sad", tree / "sadness_again")      # the same folder linked twice
  os.symlink(tree, tree / "happiness" / "loop")          # back to an ancestor: a loop
  os.symlink(store / "single.jpg", tree / "happiness" / "linked.jpg")   # a linked file
  os.symlink(store / "gone.jpg", tree / "happiness" / "broken.jpg")     # a dangling link
  src = readers.parse(["folder", str(tree), "labels=subdirs", "name=t"])
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert m["counts"] == {"happiness": 3, "sadness": 3, "unlabeled": 0}
  ids = records.load_ids(str(tmp_path / "out"))
  assert sorted(ids) == sorted([f"t/happiness/{p.name}" for p in jpgs[:2]]
                               + ["t/happiness/linked.jpg"]
                               + [f"t/sadness/{p.name}" for p in jpgs[2:5]])
  reasons = {sk["id"]: sk["reason"] for sk in m["skipped"]}
  assert set(reasons) == {"t/happiness/loop", "t/sadness_again", "t/happiness/broken.jpg"}
  assert reasons["t/happiness/loop"].startswith(f"link loop: points to {tree}")
  assert reasons["t/sadness_again"].startswith(
      "link to a folder already listed (as 'sadness'); not followed")
  assert reasons["t/happiness/broken.jpg"].startswith("broken link: points to ")
  s = m["sources"]["t"]
  assert (s["read"], s["written"], s["skipped"]) == (9, 6, 3)
  assert "link loop" in build.summary(m)


def test_a_link_to_a_folder_holding_the_source_terminates(demo_data_dir, tmp_path):
  tree = tmp_path / "data" / "tree"
  tree.mkdir(parents=True)
  for p in faces(demo_data_dir, 2):
    shutil.copy(p, tree / p.name)
  os.symlink(tmp_path / "data", tree / "up")     # up/tree/up/tree/... forever, if followed
  listed = readers.FolderSource("t", str(tree), "none").items({})
  skipped = {it.id: it.skip for it in listed if it.skip}
  assert len(listed) == 3 and list(skipped) == ["t/up"]
  assert skipped["t/up"].startswith("link loop")


def test_an_unreadable_sub_folder_is_listed_as_skipped(demo_data_dir, tmp_path, monkeypatch):
  tree = tmp_path / "tree"
  (tree / "happiness").mkdir(parents=True)
  (tree / "sadness").mkdir()
  for p, cls in zip(faces(demo_data_dir, 2), ("happiness", "sadness")):
    shutil.copy(p, tree / cls / p.name)
  os.chmod(tree / "sadness", 0)
  if os.geteuid() == 0:   # root lists anything: make the permission failure happen anyway
    real_scandir = os.scandir

    def scandir(path="."):
      if str(path).endswith("sadness"):
        raise PermissionError(13, "Permission denied", str(path))
      return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
  try:
    listed = readers.FolderSource("t", str(tree), "subdirs").items({})
  finally:
    os.chmod(tree / "sadness", 0o755)
  by_id = {it.id: it for it in listed}
  assert set(by_id) == {f"t/happiness/{faces(demo_data_dir, 1)[0].name}", "t/sadness"}
  assert by_id["t/sadness"].skip == ("unreadable folder: Permission denied; its images are not "
                                     "listed")


# ---- 2. images whose header claims a huge size ----

def _tiny_jpeg_claiming(width, height) -> bytes:
  """A real small JPEG whose start-of-frame is patched to claim width x height."""
  data = bytearray(cv2.imencode(".jpg", np.full((16, 16), 128, np.uint8))[1].tobytes())
  sof = data.index(b"\xff\xc0")
  data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  return bytes(data)


def _tiny_png_claiming(width, height) -> bytes:
  """A real small PNG whose IHDR claims width x height, its CRC fixed (so readers trust it)."""
  data = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def _tiny_bmp_claiming(width, height) -> bytes:
  data = bytearray(cv2.imencode(".bmp", np.zeros((8, 8), np.uint8))[1].tobytes())
  data[18:26] = struct.pack("<ii", width, height)
  return bytes(data)


def test_huge_header_images_are_skipped_before_decoding(demo_data_dir, tmp_path):
  tree = tmp_path / "tree"
  tree.mkdir()
  for p in faces(demo_data_dir, 2):
    shutil.copy(p, tree / p.name)
  bomb = _tiny_jpeg_claiming(40000, 40000)
  assert len(bomb) < 1000
  (tree / "bomb.jpg").write_bytes(bomb)                       # OpenCV's limit: it used to raise
  (tree / "zeros.png").write_bytes(_tiny_png_claiming(30000, 30000))   # 900 MB if decoded
  (tree / "wide.bmp").write_bytes(_tiny_bmp_claiming(30000, 20000))    # read through PIL
  src = readers.parse(["folder", str(tree), "labels=none", "name=t"])
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
  assert grew_mb < 300      # nothing was decoded at its claimed size
  assert m["num_records"] == 2
  reasons = {sk["id"]: sk["reason"] for sk in m["skipped"]}
  assert reasons == {
      "t/bomb.jpg": "too large: its header says 40000x40000 px (1600 megapixels), over "
                    "--max-pixels 100000000",
      "t/zeros.png": "too large: its header says 30000x30000 px (900 megapixels), over "
                     "--max-pixels 100000000",
      "t/wide.bmp": "too large: its header says 30000x20000 px (600 megapixels), over "
                    "--max-pixels 100000000"}
  assert "--max-pixels 100000000" in m["command"]


def test_an_image_library_error_is_a_skip_reason_not_a_crash(demo_data_dir, tmp_path):
  tree = tmp_path / "tree"
  tree.mkdir()
  for p in faces(demo_data_dir, 2):
    shutil.copy(p, tree / p.name)
  (tree / "bomb.jpg").write_bytes(_tiny_jpeg_claiming(40000, 40000))
  out = tmp_path / "out"
  # A limit above OpenCV's own (2^30 px): the header passes, OpenCV's assertion fires.
  run = cli_build("--out", str(out), "--size", "32", "--crop", "none", "--detector", "none",
                  "--max-pixels", "2000000000", "--source", "folder", str(tree), "labels=none",
                  "name=t")
  assert run.returncode == 0, run.stderr
  manifest = records.load_manifest(str(out))
  [sk] = manifest["skipped"]
  assert sk["id"] == "t/bomb.jpg"
  assert sk["reason"].startswith("not decodable: cv2.error: OpenCV(")
  assert "CV_IO_MAX_IMAGE_PIXELS" in sk["reason"] and "\n" not in sk["reason"]
  assert manifest["num_records"] == 2 and "--max-pixels 2000000000" in manifest["command"]


# ---- 3. malformed CSVs: the file and the line, one line, no traceback ----

def test_a_field_over_the_csv_limit_names_the_file_and_line(demo_data_dir, tmp_path):
  [face] = faces(demo_data_dir, 1)
  path = write_csv(tmp_path / "big.csv", [(face.name, "happiness"),
                                          ("x" * (csv.field_size_limit() + 1), "sadness"),
                                          (face.name, "happiness")])
  run = cli_build("--out", str(tmp_path / "out"), "--source", "csv", path,
                  f"root={face.parent}")
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert run.stderr.strip() == (
      f"DatasetError: {path}, line 3: field larger than field limit (131072); an image CSV's "
      "fields are short: is this the right file?")
  assert not (tmp_path / "out").exists()


def test_a_line_longer_than_any_image_csv_is_refused_unread(tmp_path):
  path = tmp_path / "huge.csv"
  with open(path, "w") as f:
    f.write("image,emotion\na.jpg,happiness\n")
    f.write("y" * (readers.csvfile.MAX_LINE + 10) + "\n")
  with pytest.raises(DatasetError) as e:
    readers.CsvSource("h", str(path)).items({})
  assert str(e.value) == (f"{path}, line 3: longer than {readers.csvfile.MAX_LINE} characters; "
                          "an image CSV's lines are short: is this the right file?")


def test_a_non_utf8_csv_names_the_file_line_and_byte(demo_data_dir, tmp_path):
  [face] = faces(demo_data_dir, 1)
  path = tmp_path / "latin.csv"
  path.write_bytes(f"image,emotion\n{face.name},happiness\n".encode()
                   + "caf\xe9.jpg,sadness\n".encode("latin-1"))
  run = cli_build("--out", str(tmp_path / "out"), "--source", "csv", str(path),
                  f"root={face.parent}")
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert run.stderr.strip() == (
      f"DatasetError: {path}, line 3: not UTF-8 (byte 0xe9 at byte column 4); save the CSV as "
      "UTF-8 (e.g. `iconv -f latin1 -t utf-8`).")


def test_an_unbalanced_quote_names_the_line_it_opened_on(demo_data_dir, tmp_path):
  jpgs = faces(demo_data_dir, 4)
  path = tmp_path / "quote.csv"
  path.write_text("image,emotion\n"
                  f"{jpgs[0].name},happiness\n"
                  f"{jpgs[1].name},\"sadness\n"          # line 3: the quote is never closed
                  f"{jpgs[2].name},anger\n"
                  f"{jpgs[3].name},fear\n")
  src = readers.CsvSource("q", str(path), root=str(jpgs[0].parent))
  with pytest.raises(DatasetError) as e:
    src.items({})
  assert str(e.value) == (
      f"{path}, line 3: the quote opening field 2 ('emotion') runs over lines 3 to 5 (an "
      "unbalanced quote merges every later row into one); close or remove it (an image CSV's "
      "fields hold no line breaks).")
  # In a long file the swallowed rows outgrow the csv module's field limit first.
  rows = "".join(f"{jpgs[2].name},anger\n" for _ in range(6000))
  path.write_text(f"image,emotion\n{jpgs[0].name},\"happiness\n" + rows)
  with pytest.raises(DatasetError) as e:
    src.items({})
  assert str(e.value).startswith(f"{path}, the row that starts on line 2 and runs to line ")
  assert "(an unbalanced quote on line 2?): field larger than field limit" in str(e.value)


def test_paper_readers_name_the_line_of_a_malformed_csv(tmp_path):
  root = tmp_path / "aff"
  root.mkdir()
  header = ",".join(readers.AffectNetSource.ALL_COLUMNS)
  (root / "training.csv").write_text(f"{header}\nx/a.jpg,1,1,9,9,\"0;0,1,0,0\nx/b.jpg,1\n")
  (root / "validation.csv").write_text(f"{header}\n")
  with pytest.raises(DatasetError) as e:
    readers.parse(["affectnet", str(root)]).items({})
  assert str(e.value).startswith(f"{root / 'training.csv'}, line 2: the quote opening field 6 "
                                 "('facial_landmarks') runs over lines 2 to 3")


# ---- 4. what the CSV reader did quietly ----

def test_backslash_paths_are_read_and_said(demo_data_dir, tmp_path):
  jpgs = faces(demo_data_dir, 3)
  (tmp_path / "images" / "sub").mkdir(parents=True)
  for p in jpgs:
    shutil.copy(p, tmp_path / "images" / "sub" / p.name)
  path = write_csv(tmp_path / "win.csv", [(f"sub\\{jpgs[0].name}", "happiness"),
                                          (f"sub\\{jpgs[1].name}", "sadness"),
                                          (f"sub/{jpgs[2].name}", "anger")])
  src = readers.CsvSource("w", path, root=str(tmp_path / "images"))
  with pytest.warns(items.ListingWarning) as caught:
    listed = src.items({})
  assert [str(w.message) for w in caught] == [
      f"{path}: 2 row(s) name their image with '\\'; read as '/' (a Windows path), so a file "
      "name that holds '\\' is not found"]
  assert sorted(it.id for it in listed if not it.skip) == sorted(f"w/sub/{p.name}" for p in jpgs)
  run = cli_build("--out", str(tmp_path / "out"), "--size", "32", "--source", "csv", path,
                  f"root={tmp_path / 'images'}", "name=w")
  assert run.returncode == 0, run.stderr
  warned = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
  assert warned == [f"warning: {path}: 2 row(s) name their image with '\\'; read as '/' (a "
                    "Windows path), so a file name that holds '\\' is not found"]


def test_a_directory_named_in_a_csv_is_called_a_directory(demo_data_dir, tmp_path):
  [face] = faces(demo_data_dir, 1)
  (tmp_path / "images" / "a_folder.jpg").mkdir(parents=True)
  shutil.copy(face, tmp_path / "images" / face.name)
  path = write_csv(tmp_path / "d.csv", [(face.name, "happiness"), ("a_folder.jpg", "sadness")])
  src = readers.CsvSource("d", path, root=str(tmp_path / "images"))
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  assert [(sk["id"], sk["reason"]) for sk in m["skipped"]] == [
      ("d/a_folder.jpg", "is a directory, not an image file")]


def test_conflicting_rows_are_not_counted_as_duplicates(demo_data_dir, tmp_path):
  jpgs = faces(demo_data_dir, 3)
  path = write_csv(tmp_path / "dup.csv", [(jpgs[0].name, "happiness"),
                                          (jpgs[0].name, "Happiness"),   # a duplicate
                                          (jpgs[1].name, "happiness"),
                                          (jpgs[1].name, "sadness"),     # a conflict
                                          (jpgs[1].name, "sadness"),
                                          (jpgs[2].name, "anger")])
  src = readers.CsvSource("dup", path, root=str(jpgs[0].parent))
  m = build.build([src], str(tmp_path / "out"), FAST, workers=1, progress=False)
  s = m["sources"]["dup"]
  assert (s["read"], s["written"], s["skipped"], s["duplicate_rows"]) == (3, 2, 1, 1)
  [sk] = m["skipped"]
  assert sk["reason"] == ("conflicting labels: 'happiness' (CSV line 4); 'sadness' (CSV line "
                          "5, 6)")


# ---- 5. a deleted build is called missing, not "write the split" ----

def test_a_deleted_build_says_build_it_and_a_missing_split_says_split_it(demo_data_dir,
                                                                         tmp_path):
  jpgs = faces(demo_data_dir, 8)
  path = write_csv(tmp_path / "l.csv", [(p.name, ("happiness", "sadness")[k % 2])
                                        for k, p in enumerate(jpgs)])
  data = str(tmp_path / "data")
  build.build([readers.CsvSource("l", path, root=str(jpgs[0].parent))], data, FAST, workers=1,
              progress=False)
  with pytest.raises(DatasetError, match=r"split file .*default\.json not found; write it with "
                     r"`python -m data_prep split --data "):
    records.load_split(data, "default", ["train_labeled"])   # a build without its split
  split.split(data, "default", split.Options(labeled_fraction=0.5, test_fraction=0.25,
                                             val_fraction=0.25))
  split.kfold(data, "cv", split.FoldOptions(folds=2, val_fraction=0.0))
  assert len(records.load_split(data, "default", ["train_labeled", "test"])) > 0
  shutil.rmtree(data)
  gone = (f"{data} does not exist: the build itself is missing (no manifest, no records); "
          f"build it with `python -m data_prep build --out {data} ...`.")
  for call in (lambda: records.load_split(data, "default", ["train_labeled"]),
               lambda: records.split_path(data, "default"),
               lambda: split.fold_names(data, "cv")):
    with pytest.raises(DatasetError) as e:
      call()
    assert str(e.value) == gone
  os.makedirs(data)   # the folder back, empty: not a build either
  with pytest.raises(DatasetError, match=rf"^{re.escape(os.path.join(data, 'manifest.json'))} "
                     rf"not found: {re.escape(data)} is not a complete build .*; build it with "
                     "`python -m data_prep build --out "):
    records.load_split(data, "default", ["train_labeled"])
  os.rmdir(data)
  # The rerun of a training command over the deleted folder.
  run = subprocess.run([sys.executable, "-m", "ssfer_jax.main", "--config",
                        "configs/pretrain.py:test", "--workdir", str(tmp_path / "run"),
                        f"--config.data.dir={data}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert f"DatasetError: {gone}" in run.stderr and "write it with" not in run.stderr
