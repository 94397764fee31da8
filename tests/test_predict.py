"""Prediction on photos and videos with a trained classifier: faces found and framed as the
build framed them, batched classification equal to the model's own forward pass, photos with no
face and unreadable inputs reported, videos read frame by frame; and its faults
(docs/RELIABILITY.md): symbolic links, huge headers, FIFOs, a file named twice, bad numbers,
truncated videos, progress on long inputs, a job directory as --model."""

import csv
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import cv2
import jax
import numpy as np
import pytest

from data_prep import images
from ssfer_jax import predict
from tests.conftest import DEMO_DATA, REPO


@pytest.fixture
def run(finetuned_run):
  return finetuned_run


@pytest.fixture(scope="module")
def predictor(finetuned_run):
  """One Predictor for the tests that only read with it (batches of 4)."""
  return predict.Predictor(finetuned_run, batch_size=4)


def scene(*names, size=(300, 480)):
  """A wider photo holding real demo faces at 1x and 2x, on a plain background."""
  canvas = np.full((*size, 3), (90, 120, 140), np.uint8)
  x = 20
  for k, name in enumerate(names):
    face = cv2.imread(str(DEMO_DATA / "images" / name))
    face = cv2.resize(face, None, fx=1 + k, fy=1 + k, interpolation=cv2.INTER_CUBIC)
    canvas[30:30 + face.shape[0], x:x + face.shape[1]] = face
    x += face.shape[1] + 40
  return canvas


def no_face(name="Andre_Agassi_0001.jpg"):
  """A real photo's 8x8 blocks shuffled: its colours and texture, no face."""
  img = cv2.imread(str(DEMO_DATA / "images" / name))
  h, w = img.shape[0] // 8 * 8, img.shape[1] // 8 * 8
  blocks = img[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 8, 8, 3)
  blocks = blocks[np.random.default_rng(0).permutation(len(blocks))]
  n = int(np.sqrt(len(blocks)))
  grid = blocks[:n * n].reshape(n, n, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(n * 8, n * 8, 3)
  return cv2.resize(grid, (200, 200), interpolation=cv2.INTER_NEAREST)


def test_faces_in_a_photo_are_framed_and_classified(run):
  p = predict.Predictor(run, batch_size=4)
  assert p.crop == "none" and p.detector_name == "haar" and p.framing > 0.9
  photo = scene("Andre_Agassi_0001.jpg", "Ariel_Sharon_0001.jpg")
  found = p.predict(photo)
  assert len(found) == 2
  # Largest first: the 2x face; both boxes where the faces were pasted.
  assert found[0].box[0] > 150 and found[1].box[0] < 150
  for f in found:
    assert abs(sum(f.probabilities.values()) - 1) < 1e-4
    assert f.label == max(f.probabilities, key=f.probabilities.get)
  # The crop the model saw is the build's framing of the box: frame() at face_framing.
  (box, crop), _ = p.detect(photo)
  stored, _ = images.frame(photo, box, "face", p.framing, p.stored_size)
  np.testing.assert_array_equal(crop, cv2.cvtColor(stored, cv2.COLOR_BGR2RGB))
  # Batched and padded = the model's own forward pass on the same crop.
  clf = p.classifier
  x = (crop[None].astype(np.float32) / 255 - np.array(clf.preprocessing["mean"])) / np.array(
      clf.preprocessing["std"])
  direct = jax.nn.softmax(clf.apply(clf.params, x.astype(np.float32)), axis=-1)[0]
  ref = p.predict(photo)[0]   # the largest face: the one detect() listed first
  np.testing.assert_allclose([ref.probabilities[c] for c in p.classes], direct, atol=1e-5)
  assert p.predict(no_face()) == []


def test_face_and_align_builds_are_framed_as_data_prep_frames_them(run):
  """A `--crop face` model gets data_prep's square crop at the build's margin; a `--crop
  align` model the five-point alignment of the detector's landmarks (BlazeFace's four)."""
  photo = scene("Andre_Agassi_0001.jpg", "Ariel_Sharon_0001.jpg")
  p = predict.Predictor(run, detector="blazeface")
  p.crop, p.margin = "face", 1.6
  (box, crop), *_ = p.detect(photo)
  stored, _ = images.frame(photo, box, "face", 1.6, p.stored_size)
  np.testing.assert_array_equal(crop, cv2.cvtColor(stored, cv2.COLOR_BGR2RGB))
  p.crop = "align"
  (box, landmarks), *_ = p._detector.detect_all(photo)  # pylint: disable=protected-access
  aligned, _ = images.align(photo, landmarks, box, 1.6, p.stored_size)
  np.testing.assert_array_equal(p.detect(photo)[0][1], cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB))


def test_cli_over_folders_lists_videos_and_bad_files(run, tmp_path, capsys):
  inputs = tmp_path / "in"
  inputs.mkdir()
  cv2.imwrite(str(inputs / "two.jpg"), scene("Andre_Agassi_0001.jpg", "Ariel_Sharon_0001.jpg"))
  cv2.imwrite(str(inputs / "none.png"), no_face())
  (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  video = cv2.VideoWriter(str(inputs / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (480, 300))
  base = scene("Ariel_Sharon_0002.jpg")
  for t in range(5):
    video.write(np.roll(base, 12 * t, axis=1))
  video.release()
  (tmp_path / "list.txt").write_text("in/two.jpg\nin/missing.jpg\n")
  out = tmp_path / "out"
  rc = predict.main(["--model", run, str(inputs), str(tmp_path / "list.txt"), "--out", str(out),
                     "--every", "2", "--annotate", "--batch-size", "4"])
  assert rc == 0
  summary = json.loads((out / "predictions.json").read_text())
  # two.jpg once (the list names it again: dropped), 2 faces; video frames 0, 2, 4: one face each.
  assert summary["images"] == 1 + 1 + 3 and summary["faces"] == 2 + 3
  assert summary["duplicates"] == 1 and summary["complete"]
  assert [w["input"].split("/")[-1] for w in summary["no_face"]] == ["none.png"]
  problems = {p["input"].split("/")[-1]: p["problem"] for p in summary["unreadable"]}
  assert problems == {"missing.jpg": "no such file or folder",
                      "broken.jpg": "not a decodable image (corrupt, truncated, or not an image file)"}
  rows = list(csv.DictReader(open(out / "predictions.csv")))
  assert len(rows) == 5 and sorted({r["frame"] for r in rows}) == ["", "0", "2", "4"]
  assert all(abs(sum(float(r[c]) for c in summary["classes"]) - 1) < 1e-3 for r in rows)
  assert sorted(p.name for p in (out / "annotated").iterdir()) == [
      "000001_clip_f000000.jpg", "000002_clip_f000002.jpg", "000003_clip_f000004.jpg",
      "000004_none.jpg", "000005_two.jpg"]   # one per image or frame
  said = capsys.readouterr()
  assert "unreadable: " in said.err
  assert "; 1 named again (the same real path), predicted once" in said.out


def test_predictor_errors(run, tmp_path):
  with pytest.raises(predict.PredictError, match="result.json not found"):
    predict.Predictor(str(tmp_path))
  with pytest.raises(predict.PredictError, match="cannot read"):
    predict.Predictor(run).predict(str(tmp_path / "nothing.jpg"))


def names(entries):
  """{file name: problem} of predict's problem entries."""
  return {os.path.basename(e["input"]): e["problem"] for e in entries}


@pytest.mark.timeout(60)
def test_symlinked_folders_and_files_are_followed_and_a_link_loop_ends(tmp_path):
  """A class folder that is a symbolic link is searched (it used to vanish without a word); a
  link back to an ancestor and a second link to a searched folder are listed as skipped."""
  elsewhere, inputs = tmp_path / "elsewhere", tmp_path / "in"
  (elsewhere / "happy").mkdir(parents=True)
  inputs.mkdir()
  for path in (inputs / "a.jpg", elsewhere / "c.jpg", elsewhere / "happy" / "b.jpg"):
    cv2.imwrite(str(path), no_face())
  (inputs / "happy").symlink_to(elsewhere / "happy")              # a symlinked class folder
  (inputs / "happy_again").symlink_to(elsewhere / "happy")        # a second link to it
  (elsewhere / "happy" / "up").symlink_to(inputs)                 # a loop: back to the top
  (inputs / "c.jpg").symlink_to(elsewhere / "c.jpg")              # a symlinked file
  (inputs / "gone.jpg").symlink_to(elsewhere / "nothing.jpg")     # a broken link
  files, problems = predict.expand_inputs([str(inputs)])
  assert [os.path.relpath(f, inputs) for f in files] == [
      "a.jpg", "c.jpg", "gone.jpg", os.path.join("happy", "b.jpg")]
  assert names(problems) == {
      "happy_again": f"skipped: the same folder as {inputs / 'happy'}, searched there (a "
                     "symbolic link loop or a second link to it)",
      "up": f"skipped: the same folder as {inputs}, searched there (a symbolic link loop or a "
            "second link to it)"}
  read = {os.path.basename(w["input"]): image for w, image in predict.frames(files, 1)}
  assert read["gone.jpg"] == "a symbolic link to a missing file"
  assert read["b.jpg"].shape == read["c.jpg"].shape == (200, 200, 3)


def huge_jpeg(path, side):
  """A real 8x8 JPEG whose start-of-frame claims side x side pixels (631 bytes)."""
  data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
  struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, side, side)
  path.write_bytes(bytes(data))


def huge_png(path, side):
  """A real 8x8 PNG whose IHDR claims side x side pixels, its CRC redone."""
  data = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
  struct.pack_into(">II", data, 16, side, side)
  struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
  path.write_bytes(bytes(data))


def test_huge_header_images_are_skipped_before_decoding(predictor, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  huge_jpeg(inputs / "bomb.jpg", 40000)
  huge_png(inputs / "zeros.png", 30000)
  cv2.imwrite(str(inputs / "face.jpg"), scene("Andre_Agassi_0001.jpg"))   # 480 x 300
  assert (inputs / "bomb.jpg").stat().st_size == 631
  summary = predict.run(predictor, [str(inputs)], str(tmp_path / "out"))
  problems = names(summary["unreadable"])
  assert set(problems) == {"bomb.jpg", "zeros.png"}
  assert "40000x40000" in problems["bomb.jpg"]
  assert "over --max-pixels 100000000" in problems["bomb.jpg"]
  assert "30000x30000" in problems["zeros.png"]
  assert summary["images"] == 1 and summary["faces"] == 1
  # The limit is --max-pixels'; above it, OpenCV's own limit (2^30 pixels) raises inside the
  # decoder: its words become the file's reason, the run goes on.
  summary = predict.run(predictor, [str(inputs / "bomb.jpg"), str(inputs / "face.jpg")],
                        str(tmp_path / "out2"), max_pixels=2**31)
  assert "CV_IO_MAX_IMAGE_PIXELS" in names(summary["unreadable"])["bomb.jpg"]
  assert summary["images"] == 1
  summary = predict.run(predictor, [str(inputs / "face.jpg")], str(tmp_path / "out3"),
                        max_pixels=480 * 300 - 1)
  assert "480x300" in names(summary["unreadable"])["face.jpg"] and summary["images"] == 0


@pytest.mark.timeout(30)
def test_a_fifo_named_like_an_image_or_a_video_is_never_opened(tmp_path):
  """Opening a FIFO blocks until someone writes to it: predict used to hang forever."""
  inputs = tmp_path / "in"
  inputs.mkdir()
  os.mkfifo(inputs / "fifo.jpg")
  os.mkfifo(inputs / "fifo.mp4")
  files, problems = predict.expand_inputs([str(inputs), str(inputs / "fifo.jpg")])
  assert problems == [] and len(files) == 3
  why = ("not a regular file (a FIFO, device or socket named like an image or video); only "
         "regular files are read")
  assert [(os.path.basename(w["input"]), r) for w, r in predict.frames(files, 1)] == [
      ("fifo.jpg", why), ("fifo.mp4", why), ("fifo.jpg", why)]


def test_a_file_named_twice_is_predicted_once_and_annotating_never_loses_predictions(
    predictor, tmp_path):
  """The same photo by a folder, a list and twice by path: predicted and annotated once (two
  copies in one batch used to end the run in a KeyError, with no predictions written). An
  annotated/ that cannot be written (a file in its place) loses no prediction."""
  inputs = tmp_path / "in"
  inputs.mkdir()
  cv2.imwrite(str(inputs / "two.jpg"), scene("Andre_Agassi_0001.jpg", "Ariel_Sharon_0001.jpg"))
  cv2.imwrite(str(inputs / "none.png"), no_face())
  (tmp_path / "list.txt").write_text("in/two.jpg\n")
  twice = [str(inputs), str(tmp_path / "list.txt"), str(inputs / "two.jpg"),
           str(tmp_path / "in" / "." / "two.jpg")]
  out = tmp_path / "out"
  summary = predict.run(predictor, twice, str(out), annotate_images=True)
  assert summary["duplicates"] == 3 and summary["images"] == 2 and summary["faces"] == 2
  assert sorted(p.name for p in (out / "annotated").iterdir()) == ["000001_none.jpg",
                                                                  "000002_two.jpg"]
  out = tmp_path / "blocked"
  out.mkdir()
  (out / "annotated").write_text("a file where the folder goes")
  summary = predict.run(predictor, twice, str(out), annotate_images=True)
  assert summary["complete"] and summary["faces"] == 2
  assert [len(list(csv.DictReader(open(out / "predictions.csv")))),
          len(json.loads((out / "predictions.json").read_text())["predictions"])] == [2, 2]
  assert [(os.path.basename(p["input"]), p["problem"].split(":")[0])
          for p in summary["not_annotated"]] == [("none.png", "FileExistsError"),
                                                  ("two.jpg", "FileExistsError")]


def test_bad_numbers_end_in_one_line_and_status_2(tmp_path, capsys):
  """--batch-size 0 gave a traceback; a negative one exited 0, every face reported as none."""
  out = subprocess.run(
      [sys.executable, "-m", "ssfer_jax.predict", str(tmp_path), "--model", str(tmp_path),
       "--out", str(tmp_path / "out"), "--batch-size", "0"], cwd=REPO, capture_output=True,
      text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 2
  assert out.stderr.splitlines() == ["PredictError: --batch-size 0: must be 1 or more."]
  for flag, value in (("--batch-size", "-3"), ("--every", "0"), ("--max-pixels", "-1")):
    assert predict.main([str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                         flag, value]) == 2
    assert capsys.readouterr().err == f"PredictError: {flag} {value}: must be 1 or more.\n"
  with pytest.raises(predict.PredictError, match="--batch-size -1: must be 1 or more"):
    predict.Predictor(str(tmp_path), batch_size=-1)


def test_a_truncated_video_is_reported_where_it_ends(predictor, tmp_path, caplog):
  clip, cut = tmp_path / "clip.avi", tmp_path / "cut.avi"
  video = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (200, 200))
  for t in range(20):
    video.write(np.roll(no_face(), 8 * t, axis=1))
  video.release()
  cut.write_bytes(clip.read_bytes()[:clip.stat().st_size // 2])
  reader, decodable = cv2.VideoCapture(str(cut)), 0
  while reader.read()[0]:
    decodable += 1
  assert 0 < decodable < 20
  with caplog.at_level(logging.WARNING):
    summary = predict.run(predictor, [str(clip), str(cut)], str(tmp_path / "out"))
  assert summary["images"] == 20 + decodable
  why = (f"the video ended after {decodable} of the 20 frames its container declares "
         f"(truncated or damaged): frames {decodable}-19 were not predicted")
  assert summary["unreadable"] == [{"input": str(cut), "frame": decodable, "problem": why}]
  assert f"{cut}: {why}" in caplog.messages


def test_progress_lines_give_the_rate_and_the_time_left(predictor, tmp_path, caplog):
  inputs = tmp_path / "in"
  inputs.mkdir()
  for k in range(3):
    cv2.imwrite(str(inputs / f"{k}.png"), no_face())
  with caplog.at_level(logging.INFO):
    predict.run(predictor, [str(inputs)], str(tmp_path / "out"), progress_every_s=0)
  lines = [m for m in caplog.messages if m.startswith("predict: file")]
  assert [m.split(",")[0] for m in lines] == [
      "predict: file 1/3 (33%)", "predict: file 2/3 (67%)", "predict: file 3/3 (100%)"]
  assert all(re.fullmatch(r"predict: file \d/3 \(\d+%\), [\d.]+ images/s, ETA \dm\d\ds", m)
             for m in lines) and lines[-1].endswith("ETA 0m00s")
  caplog.clear()
  with caplog.at_level(logging.INFO):   # the default: a line every 10 s, none in a short run
    predict.run(predictor, [str(inputs)], str(tmp_path / "out"))
  assert not [m for m in caplog.messages if m.startswith("predict: file")]


def test_a_job_directory_as_model_uses_its_last_finished_classifier_stage(
    run, tmp_path, caplog, capsys):
  """The one-command job's WORKDIR holds a run per stage (ssfer_jax/job.py). Here its finetune/
  is the real stage-2 run; semisup/ is first started (a config, no result), then finished: a
  copy of that run stands in for stage 3, since training one would take most of the test."""
  job = tmp_path / "job"
  shutil.copytree(run, job / "finetune")
  (job / "semisup").mkdir()
  (job / "semisup" / "config.json").write_text("{}")
  with caplog.at_level(logging.INFO):
    assert predict.Predictor(str(job)).run == str(job / "finetune")
  assert (f"{job} is a job directory: using its last finished classifier stage, "
          f"{job / 'finetune'} (semisup/ not finished)") in caplog.messages
  photo = tmp_path / "two.jpg"
  cv2.imwrite(str(photo), scene("Andre_Agassi_0001.jpg", "Ariel_Sharon_0001.jpg"))
  assert predict.main(["--model", str(job), str(photo), "--out", str(tmp_path / "out")]) == 0
  assert f"{job / 'finetune'}: " in capsys.readouterr().err
  shutil.copytree(run, job / "semisup", dirs_exist_ok=True)
  assert predict.Predictor(str(job)).run == str(job / "semisup")
  for stage in ("finetune", "semisup"):
    os.remove(job / stage / "result.json")
  with pytest.raises(predict.PredictError) as e:
    predict.Predictor(str(job))
  assert str(e.value) == (
      f"--model {job}: {job} is a job directory, but none of its classifier stages has finished "
      f"(finetune/, semisup/ hold no result.json): rerun the job's command to finish finetune, "
      f"then pass {job} or {job / 'finetune'}.")
