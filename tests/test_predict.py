"""Prediction on photos and videos with a trained classifier: faces found and framed as the
build framed them, batched classification equal to the model's own forward pass, photos with no
face and unreadable inputs reported, videos read frame by frame."""

import csv
import json

import cv2
import jax
import numpy as np
import pytest

from data_prep import images
from ssfer_jax import predict
from tests.conftest import DEMO_DATA


@pytest.fixture
def run(finetuned_run):
  return finetuned_run


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
  # two.jpg twice (folder and list): 4 faces; video frames 0, 2, 4: one face each.
  assert summary["images"] == 2 + 1 + 3 and summary["faces"] == 4 + 3
  assert [w["input"].split("/")[-1] for w in summary["no_face"]] == ["none.png"]
  problems = {p["input"].split("/")[-1]: p["problem"] for p in summary["unreadable"]}
  assert problems == {"missing.jpg": "no such file or folder",
                      "broken.jpg": "not a decodable image (corrupt, truncated, or not an image file)"}
  rows = list(csv.DictReader(open(out / "predictions.csv")))
  assert len(rows) == 7 and sorted({r["frame"] for r in rows}) == ["", "0", "2", "4"]
  assert all(abs(sum(float(r[c]) for c in summary["classes"]) - 1) < 1e-3 for r in rows)
  assert sorted(p.name for p in (out / "annotated").iterdir()) == [
      "000001_clip_f000000.jpg", "000002_clip_f000002.jpg", "000003_clip_f000004.jpg",
      "000004_none.jpg", "000005_two.jpg", "000006_two.jpg"]   # one per image or frame
  assert "unreadable: " in capsys.readouterr().err


def test_predictor_errors(run, tmp_path):
  with pytest.raises(predict.PredictError, match="result.json not found"):
    predict.Predictor(str(tmp_path))
  with pytest.raises(predict.PredictError, match="cannot read"):
    predict.Predictor(run).predict(str(tmp_path / "nothing.jpg"))
