"""Pixel-level data_prep on real faces: decoding odd files, detection, crop geometry."""

import struct

import cv2
import numpy as np
import pytest

from data_prep import faces, images

GREY_FACE = "Abdoulaye_Wade_0001.jpg"   # 96x96 grey (LFW)
COLOUR_FACE = "Dwarakish_103.jpg"       # 96x72 colour, not square


@pytest.fixture(scope="module")
def grey(demo_data_dir):
  return cv2.imread(str(demo_data_dir / "images" / GREY_FACE), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def colour(demo_data_dir):
  return cv2.imread(str(demo_data_dir / "images" / COLOUR_FACE), cv2.IMREAD_UNCHANGED)


def _png(image) -> bytes:
  ok, buf = cv2.imencode(".png", image)
  assert ok
  return buf.tobytes()


def _jpeg_with_orientation(image, orientation: int, big_endian: bool = False) -> bytes:
  """A JPEG carrying an EXIF APP1 block whose only tag is the orientation."""
  e = ">" if big_endian else "<"
  tiff = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1)
  tiff += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
  app1 = b"Exif\0\0" + tiff
  jpeg = images.encode_jpeg(image, 95)
  return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_decode_grey_and_colour_losslessly(grey, colour):
  assert grey.ndim == 2 and colour.ndim == 3
  np.testing.assert_array_equal(images.decode(_png(grey)), grey)
  np.testing.assert_array_equal(images.decode(_png(colour)), colour)


def test_decode_alpha_composites_over_pad_value(colour):
  alpha = np.zeros(colour.shape[:2], np.uint8)
  alpha[10:60, 10:50] = 255
  alpha[60:70, 10:50] = 128
  out = images.decode(_png(np.dstack([colour, alpha])))
  assert out.shape == colour.shape
  np.testing.assert_array_equal(out[10:60, 10:50], colour[10:60, 10:50])
  assert (out[:10] == images.PAD_VALUE).all() and (out[:, 50:] == images.PAD_VALUE).all()
  half = np.round(colour[60:70, 10:50] * (128 / 255) + images.PAD_VALUE * (127 / 255))
  np.testing.assert_allclose(out[60:70, 10:50], half, atol=1)


def test_decode_16_bit_scales_to_8_bit(grey, colour):
  for image in (grey, colour):
    wide = image.astype(np.uint16) * 257  # 8-bit v -> 16-bit v * 257 exactly
    raw = _png(wide)
    assert cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    np.testing.assert_array_equal(images.decode(raw), image)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_applies_exif_orientation_like_opencv(colour, orientation):
  raw = _jpeg_with_orientation(colour, orientation)
  ours = images.decode(raw)
  theirs = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF itself
  np.testing.assert_array_equal(ours, theirs)
  assert ours.shape[:2] == (colour.shape[:2] if orientation <= 4 else colour.shape[1::-1])


def test_exif_orientation_6_is_a_clockwise_quarter_turn(colour):
  upright = images.decode(_jpeg_with_orientation(colour, 1))
  turned = images.decode(_jpeg_with_orientation(colour, 6, big_endian=True))
  np.testing.assert_array_equal(turned, np.rot90(upright, k=-1))


def test_decode_rejects_bad_bytes(demo_data_dir):
  data = (demo_data_dir / "images" / GREY_FACE).read_bytes()
  for bad, reason in [(b"", "empty file"), (data[: len(data) // 2], "not a decodable image"),
                      (b"user.id,image,emotion\n" * 20, "not a decodable image")]:
    with pytest.raises(images.ImageError, match=reason):
      images.decode(bad)


def test_haar_finds_real_faces_near_the_centre(demo_data_dir):
  detect = faces.Haar()
  paths = sorted((demo_data_dir / "images").glob("*_0001.jpg"))[:30]
  boxes = []
  for p in paths:
    image = images.decode(p.read_bytes())
    box = detect(image)
    if box is not None:
      _, norm = images.frame(image, box, "none", 1.25, 64)
      boxes.append(norm)
  assert len(boxes) >= 25, f"Haar found faces in only {len(boxes)} of 30 real faces"
  for x0, y0, x1, y1 in boxes:
    assert x0 < 0.5 < x1 and y0 < 0.5 < y1
    assert (x1 - x0) * (y1 - y0) > 0.2  # these LFW crops are tight: the face fills the frame


def test_face_crop_box_maps_back_to_the_pasted_face(grey):
  """Paste a real face into a larger canvas at a known place, detect, crop, map back."""
  detect = faces.Haar()
  face = cv2.resize(grey, (192, 192), interpolation=cv2.INTER_CUBIC)
  ox, oy = 250, 40  # a 480x360 canvas around it; its edges continue outwards as background
  canvas = cv2.copyMakeBorder(face, oy, 360 - 192 - oy, ox, 480 - 192 - ox, cv2.BORDER_REPLICATE)
  ref = detect(face)
  box = detect(canvas)
  assert ref is not None and box is not None
  expect = (ref[0] + ox, ref[1] + oy, ref[2] + ox, ref[3] + oy)
  assert _iou(box, expect) > 0.7

  size, margin = 64, 1.25
  stored, norm = images.frame(canvas, box, "face", margin, size)
  assert stored.shape == (size, size)
  side, left, top = images.square(box, margin)
  assert side == round(margin * max(box[2] - box[0], box[3] - box[1]))
  back = (left + norm[0] * side, top + norm[1] * side, left + norm[2] * side, top + norm[3] * side)
  np.testing.assert_allclose(back, box, atol=1e-6)
  # The stored pixels are the canvas square resized; the box is centred in it.
  window = canvas[top:top + side, left:left + side]
  np.testing.assert_array_equal(stored, images.resize(window, size))
  assert abs((norm[0] + norm[2]) / 2 - 0.5) < 1 / side
  assert abs((norm[1] + norm[3]) / 2 - 0.5) < 1 / side


def test_face_crop_pads_past_the_border(colour):
  h, w = colour.shape[:2]
  box = (w - 30.0, 5.0, w + 10.0, 45.0)  # a box running off the right edge
  stored, norm = images.frame(colour, box, "face", 1.5, 60)  # 60 px crop, 1:1 scale
  side, left, top = images.square(box, 1.5)
  assert side == 60 and stored.shape == (60, 60, 3)
  inside = w - left
  np.testing.assert_array_equal(stored[:, inside:], images.PAD_VALUE)
  np.testing.assert_array_equal(stored[-top:, :inside], colour[:side + top, left:])
  np.testing.assert_array_equal(stored[:-top], images.PAD_VALUE)
  assert norm == pytest.approx(tuple((v - o) / 60 for v, o in zip(box, (left, top) * 2)))


def test_no_face_keeps_the_whole_image(colour):
  h, w = colour.shape[:2]
  stored, norm = images.frame(colour, None, "face", 1.25, 48)
  assert stored.shape == (48, 48, 3)
  pad = (h - w) / 2 / h   # the image padded to an h x h square, centred
  assert norm == pytest.approx((pad, 0.0, 1 - pad, 1.0), abs=1 / h)
  _, norm = images.frame(colour, None, "none", 1.25, 48)
  assert norm == (0.0, 0.0, 1.0, 1.0)


def test_resize_interpolation_by_direction(grey):
  np.testing.assert_array_equal(images.resize(grey, 48),
                                cv2.resize(grey, (48, 48), interpolation=cv2.INTER_AREA))
  np.testing.assert_array_equal(images.resize(grey, 150),
                                cv2.resize(grey, (150, 150), interpolation=cv2.INTER_CUBIC))


def test_yunet_without_a_model_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="--yunet-model"):
    faces.make("yunet", str(tmp_path / "face_detection_yunet.onnx"))
  with pytest.raises(FileNotFoundError, match="--yunet-model"):
    faces.make("yunet", None)


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
