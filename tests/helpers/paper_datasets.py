"""Small copies of RAF-DB, FERPlus and AffectNet in their exact on-disk formats, made from
real faces of the demo data (the datasets themselves cannot be downloaded here).

Each writer returns what the reader must find: {record id: (label, partition)} of the rows
that should become records, and {id or line tag: reason prefix} of the rows that must be
skipped. Landmarks are the alignment template placed in the image's face box, so they sit
where a face's eyes, nose and mouth are on these tightly cropped photos.
"""

from __future__ import annotations

import csv
import os

import cv2
import numpy as np

from data_prep import build, images, readers


def demo_images(demo_data_dir, n: int) -> list[np.ndarray]:
  files = sorted(os.listdir(demo_data_dir / "images"))
  picks = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]
  return [cv2.imread(str(demo_data_dir / "images" / f), cv2.IMREAD_COLOR) for f in picks]


def face_landmarks(image: np.ndarray) -> np.ndarray:
  """Five plausible landmarks: the template in the central square of the image."""
  h, w = image.shape[:2]
  side = min(h, w)
  return images.TEMPLATE_112 / 112.0 * side + ((w - side) / 2, (h - side) / 2)


def write_rafdb(root, demo_data_dir) -> tuple[dict, dict]:
  """basic/EmoLabel/list_patition_label.txt, Image/{aligned,original}, Annotation/{boxes,
  manual}: 6 train and 3 test faces, plus a malformed row, a label 9 and a missing file."""
  faces = demo_images(demo_data_dir, 9)
  for d in ("EmoLabel", "Image/aligned", "Image/original", "Annotation/boxes",
            "Annotation/manual"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  lines, want = [], {}
  for i, face in enumerate(faces):
    stem = f"train_{i + 1:05d}" if i < 6 else f"test_{i - 5:04d}"
    label = 1 + i % 7
    lines.append(f"{stem}.jpg {label}")
    cv2.imwrite(os.path.join(root, "Image/original", f"{stem}.jpg"), face)
    cv2.imwrite(os.path.join(root, "Image/aligned", f"{stem}_aligned.jpg"),
                cv2.resize(face, (100, 100), interpolation=cv2.INTER_AREA))
    h, w = face.shape[:2]
    with open(os.path.join(root, "Annotation/boxes", f"{stem}_boundingbox.txt"), "w") as f:
      f.write(f"{0.1 * w:.2f} {0.1 * h:.2f} {0.9 * w:.2f} {0.9 * h:.2f}\n")
    with open(os.path.join(root, "Annotation/manual", f"{stem}_manu_attri.txt"), "w") as f:
      f.writelines(f"{x:.2f}\t{y:.2f}\n" for x, y in face_landmarks(face))
      f.write("1\n0\n2\n")   # gender, race, age
    want[f"rafdb/{stem}.jpg"] = (label, "train" if i < 6 else "test")
  lines += ["train_09999.jpg", "train_09998.jpg 9", "test_9999.jpg 4"]
  with open(os.path.join(root, "EmoLabel/list_patition_label.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  skipped = {"rafdb/line00010": "malformed row", "rafdb/train_09998.jpg": "bad label",
             "rafdb/test_9999.jpg": "missing"}
  return want, skipped


FERPLUS_HEADER = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger",
                  "disgust", "fear", "contempt", "unknown", "NF"]


def write_ferplus(root, demo_data_dir) -> tuple[dict, dict]:
  """fer2013.csv + fer2013new.csv, row by row: clear majorities in each Usage, single votes
  that must be zeroed, no majority, majority unknown / NF, an image FERPlus dropped, a
  pixel string that is not 48x48."""
  os.makedirs(root, exist_ok=True)
  faces = demo_images(demo_data_dir, 10)
  votes = [  # (Usage, votes over FERPLUS_HEADER[2:], expected column or skip reason)
      ("Training", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], "happiness"),
      ("Training", [6, 1, 1, 1, 1, 0, 0, 0, 0, 0], "neutral"),   # single votes zeroed: 6 of 6
      ("Training", [3, 0, 3, 0, 0, 0, 0, 0, 0, 0], "no majority"),    # 3 of 6
      ("Training", [0, 0, 0, 0, 0, 0, 0, 0, 8, 2], "majority 'unknown'"),
      ("PublicTest", [0, 0, 0, 0, 0, 0, 0, 0, 1, 9], "majority 'NF'"),
      ("PublicTest", [1, 0, 0, 7, 0, 0, 0, 2, 0, 0], "sadness"),
      ("PrivateTest", [0, 0, 0, 0, 9, 1, 0, 0, 0, 0], "anger"),
      ("PrivateTest", [0, 0, 0, 0, 0, 0, 0, 3, 0, 0], "contempt"),
      ("Training", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], "no image name"),
      ("Training", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], "bad pixels"),
  ]
  pixel_rows, vote_rows, want, skipped = [], [], {}, {}
  partition = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
  for i, (face, (usage, v, expect)) in enumerate(zip(faces, votes)):
    grey = cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (48, 48),
                      interpolation=cv2.INTER_AREA)
    values = grey.ravel().tolist()[:-1] if expect == "bad pixels" else grey.ravel().tolist()
    pixel_rows.append([0, " ".join(map(str, values)), usage])
    name = "" if expect == "no image name" else f"fer{i:07d}.png"
    vote_rows.append([usage, name] + v)
    rid = f"ferplus/{usage}/{name}" if name else f"ferplus/line{i + 2:05d}"
    if expect in FERPLUS_HEADER:
      want[rid] = (expect, partition[usage])
    else:
      skipped[rid] = expect
  with open(os.path.join(root, "fer2013.csv"), "w", newline="") as f:
    csv.writer(f).writerows([["emotion", "pixels", "Usage"]] + pixel_rows)
  with open(os.path.join(root, "fer2013new.csv"), "w", newline="") as f:
    csv.writer(f).writerows([FERPLUS_HEADER] + vote_rows)
  return want, skipped


AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal"]


def landmarks_68(face: np.ndarray) -> np.ndarray:
  """68 points whose 5-point reduction is `face_landmarks`: eye rings around the eye
  centres, the nose tip at 30, the mouth corners at 48 and 54, the rest on the face."""
  five = face_landmarks(face)
  pts = np.tile(five.mean(0), (68, 1))
  ring = np.array([[-3, 0], [-1.5, -1], [1.5, -1], [3, 0], [1.5, 1], [-1.5, 1]])
  pts[36:42], pts[42:48] = five[0] + ring, five[1] + ring
  pts[30], pts[48], pts[54] = five[2], five[3], five[4]
  return pts


def write_affectnet(root, demo_data_dir) -> tuple[dict, dict]:
  """training.csv / validation.csv / Manually_Annotated_Images: expressions 0-7 kept (0-6
  for AffectNet-7), 8-10 excluded, a bad expression, a missing image."""
  faces = demo_images(demo_data_dir, 12)
  rows = {"training.csv": [], "validation.csv": []}
  want, skipped = {}, {}
  expressions = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "x"]
  for i, (face, expr) in enumerate(zip(faces, expressions)):
    csv_name = "validation.csv" if i % 3 == 2 else "training.csv"
    rel = f"{100 + i}/img{i:03d}.jpg"
    os.makedirs(os.path.join(root, "Manually_Annotated_Images", str(100 + i)), exist_ok=True)
    cv2.imwrite(os.path.join(root, "Manually_Annotated_Images", rel), face)
    h, w = face.shape[:2]
    marks = ";".join(f"{v:.2f}" for v in landmarks_68(face).ravel())
    rows[csv_name].append([rel, int(0.1 * w), int(0.1 * h), int(0.8 * w), int(0.8 * h), marks,
                           expr, 0.1, 0.2])
    partition = "test" if csv_name == "validation.csv" else "train"
    if isinstance(expr, int) and expr <= 7:
      want[f"affectnet/{rel}"] = (expr, partition)
    else:
      skipped[f"affectnet/{rel}"] = "excluded expression" if expr != "x" else "bad expression"
  rows["training.csv"].append(["999/gone.jpg", 1, 1, 20, 20, marks, 1, 0, 0])
  skipped["affectnet/999/gone.jpg"] = "missing file"
  rows["validation.csv"].append(rows["training.csv"][0])   # listed in both CSVs: train wins
  skipped["affectnet/" + rows["training.csv"][0][0]] = "duplicate"
  for name, rs in rows.items():   # validation.csv without its header row, as some releases
    with open(os.path.join(root, name), "w", newline="") as f:
      csv.writer(f).writerows(([AFFECTNET_HEADER] if name == "training.csv" else []) + rs)
  return want, skipped


def ferplus_dataset(root, demo_data_dir, n: int = 60) -> str:
  """A built FERPlus-format dataset of `n` faces, 48 px: two thirds Training, the rest
  PublicTest and PrivateTest, one clear majority each over neutral..sadness in turn."""
  faces = demo_images(demo_data_dir, n)
  pixel_rows, vote_rows = [], []
  for i, face in enumerate(faces):
    usage = ("Training" if i < 2 * n // 3 else "PublicTest" if i < 5 * n // 6
             else "PrivateTest")
    grey = cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (48, 48))
    pixel_rows.append([0, " ".join(map(str, grey.ravel().tolist())), usage])
    votes = [0] * 10
    votes[i % 4] = 10
    vote_rows.append([usage, f"fer{i:07d}.png"] + votes)
  with open(os.path.join(root, "fer2013.csv"), "w", newline="") as f:
    csv.writer(f).writerows([["emotion", "pixels", "Usage"]] + pixel_rows)
  with open(os.path.join(root, "fer2013new.csv"), "w", newline="") as f:
    csv.writer(f).writerows([FERPLUS_HEADER] + vote_rows)
  out = os.path.join(root, "out")
  build.build([readers.parse(["ferplus", str(root)])], out,
              build.Config(size=48, crop="none", detector="none"), workers=1, progress=False)
  return out
