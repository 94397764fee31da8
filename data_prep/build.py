"""`python -m data_prep build`: raw face images -> ArrayRecord shards, ids.txt, manifest.json.

Every source is listed and the inputs sorted by record id; input i of N belongs to shard
floor(i * S / N) (contiguous ranges). A shard's bytes therefore depend only on the inputs
and the options, so one machine building shard i (`build_part`) writes exactly what the
single-machine `build` writes, and `finalize` assembles parts into the same dataset.
Per-image work runs in a process pool, results come back in input order, and everything
is written to a staging directory that is renamed into place last: a directory named OUT
with a manifest.json in it is always a complete build.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
from concurrent import futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys

import cv2
import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from data_prep import faces, images, items as items_lib, readers
from ssfer_jax.errors import DatasetError
from ssfer_jax.input import records

WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access (grain)
PART_FILE = "part.json"
UNLABELED_KEY = "unlabeled"  # the counts entry for label -1
_PART_DIR = re.compile(r"^part-(\d{5})-of-(\d{5})$")
_CHUNKSIZE = 16


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that decides the bytes of a build (and so goes into the manifest)."""
  size: int = 224
  crop: str = "face"
  margin: float = 1.25
  detector: str = "haar"
  yunet_model: str | None = None
  jpeg_quality: int = 90
  min_size: int = 32
  classes: tuple[str, ...] | None = None  # ordered; None: the sorted set of labels seen
  aliases: tuple[tuple[str, str], ...] = ()  # (from, to) label pairs
  num_shards: int = 1
  keep_corrupt: bool = False   # keep JPEGs libjpeg decodes only by guessing, flagged
  max_pixels: int = images.DEFAULT_MAX_PIXELS   # skipped above, by the header

  def check(self):
    bad = [(self.size >= 8, f"--size {self.size}: want at least 8 px"),
           (self.crop in images.CROPS, f"--crop {self.crop!r}: want one of {images.CROPS}"),
           (self.margin > 0, f"--margin {self.margin}: want > 0 (1.25 keeps some context)"),
           (self.detector in faces.DETECTORS,
            f"--detector {self.detector!r}: want one of {faces.DETECTORS}"),
           (1 <= self.jpeg_quality <= 100, f"--jpeg-quality {self.jpeg_quality}: want 1..100"),
           (self.min_size >= 1, f"--min-size {self.min_size}: want >= 1"),
           (self.num_shards >= 1, f"--num-shards {self.num_shards}: want >= 1"),
           (self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: want >= 1"),
           (self.classes is None or len(self.classes) > 0, "--classes is empty")]
    for ok, msg in bad:
      if not ok:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class Plan:
  items: list[items_lib.Item]  # the global input order
  classes: list[str]
  header: dict                   # manifest fields fixed before any pixel is read


def plan(srcs: list, cfg: Config) -> Plan:
  """Lists and orders every input, fixes the class list; reads no pixels."""
  cfg.check()
  if not srcs:
    raise ValueError("no sources: give at least one --source")
  names = [s.name for s in srcs]
  if len(set(names)) != len(names):
    raise DatasetError(f"source names {names} repeat; give each --source a distinct name=...")
  aliases = {items_lib.normalise_label(a, {}): b.strip().lower() for a, b in cfg.aliases}
  items = sorted((it for s in srcs for it in s.items(aliases)), key=lambda it: it.id)
  # One record per id: a reader may list an image twice (AffectNet's two CSVs, say); the
  # first listing stands (sort is stable: source order, then listing order).
  kept = set()
  for k, it in enumerate(items):
    if it.skip:
      continue
    if it.id in kept:
      items[k] = dataclasses.replace(it, skip=f"duplicate: {it.id} is listed again (as "
                                     f"{it.path})")
    kept.add(it.id)
  if cfg.classes is not None:
    classes = [items_lib.normalise_label(c, aliases) for c in cfg.classes]
    if len(set(classes)) != len(classes):
      raise ValueError(f"--classes {','.join(cfg.classes)}: names repeat after normalising")
  else:   # the first benchmark's own order, then any other label seen, sorted
    declared = next((list(s.class_order) for s in srcs if getattr(s, "class_order", None)), [])
    seen = {it.label for it in items if it.label is not None and not it.skip}
    classes = declared + sorted(seen - set(declared))
  if UNLABELED_KEY in classes:
    raise DatasetError(f"a class is named {UNLABELED_KEY!r}, which the manifest's counts use for "
                       "label -1; rename it with --alias unlabeled=NAME.")
  known = set(classes)
  unknown = f"(known: {', '.join(classes)})"
  items = [dataclasses.replace(it, skip=f"unknown label {it.label!r} {unknown}")
           if not it.skip and it.label is not None and it.label not in known else it
           for it in items]
  if cfg.detector == "dataset":
    boxless = [s.name for s in srcs if not getattr(s, "has_boxes", None)]
    if boxless:
      raise DatasetError(f"--detector dataset needs the dataset's boxes, but source(s) {boxless} "
                         "have none: give box_cols=x0,y0,x1,y1 on their csv --source (rafdb: "
                         "images=original), or use --detector haar.")
  if cfg.crop == "align" and cfg.detector not in ("yunet", "blazeface"):
    blind = [s.name for s in srcs if s.kind not in ("rafdb", "affectnet")
             or not getattr(s, "has_boxes", False)]
    if blind:
      raise DatasetError(f"--crop align needs five landmarks per face, but source(s) {blind} "
                         "ship none: use --detector blazeface or yunet (they find them), or "
                         "another --crop.")
  detector_params = faces.params(cfg.detector)
  if cfg.detector == "yunet":
    faces.YuNet(cfg.yunet_model)  # fails now, clearly, rather than in every worker
    detector_params["model_sha256"] = items_lib.sha256_file(cfg.yunet_model)
  if cfg.detector == "blazeface":
    detector_params["model_sha256"] = items_lib.sha256_file(faces.blazeface_model())
  header = {
      "schema_version": records.SCHEMA_VERSION,
      "classes": classes,
      "image_size": cfg.size,
      "crop": cfg.crop,
      "margin": cfg.margin,
      "detector": cfg.detector,
      "detector_params": detector_params,
      "jpeg_quality": cfg.jpeg_quality,
      "min_size": cfg.min_size,
      "pad_value": images.PAD_VALUE,
      "image_encoding": ("JPEG of the size x size crop; grey inputs 1 channel, colour 3; alpha "
                         "composited over pad_value; 16 bit scaled to 8; EXIF orientation "
                         "applied; resize INTER_AREA when shrinking, INTER_CUBIC otherwise"),
      "num_shards": cfg.num_shards,
      "writer_options": WRITER_OPTIONS,
      "sources": {s.name: s.spec() for s in srcs},
      "options": dataclasses.asdict(cfg),
      "command": command_line(srcs, cfg),
  }
  return Plan(items, classes, json.loads(json.dumps(header)))


def command_line(srcs: list, cfg: Config) -> str:
  """A command that rebuilds these bytes (out, workers and progress do not change them)."""
  args = ["python -m data_prep build --out OUT"]
  for s in srcs:
    spec = {k: v for k, v in dataclasses.asdict(s).items() if v is not None}
    first = spec.pop("dataset", None) or spec.pop("path")
    if isinstance(spec.get("box_cols"), (tuple, list)):
      spec["box_cols"] = ",".join(spec["box_cols"])
    args.append(" ".join(["--source", s.kind, first] + [f"{k}={v}" for k, v in spec.items()]))
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.name == "classes" and value is not None:
      args.append(f"--classes {','.join(value)}")
    elif f.name == "aliases":
      args.extend(f"--alias {a}={b}" for a, b in value)
    elif isinstance(value, bool):
      args.extend([f"--{f.name.replace('_', '-')}"] if value else [])
    elif value is not None and f.name != "classes":
      args.append(f"--{f.name.replace('_', '-')} {value}")
  return " ".join(args)


def shard_bounds(num_items: int, num_shards: int, shard: int) -> tuple[int, int]:
  return shard * num_items // num_shards, (shard + 1) * num_items // num_shards


def build(srcs: list, out: str, cfg: Config = Config(), *, workers: int | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:
  """Builds the whole dataset at `out`; returns its manifest."""
  out = _check_out(out, overwrite)
  p = plan(srcs, cfg)
  staging = _staging(out)
  try:
    parts = _run(p, cfg, range(cfg.num_shards), staging, workers, progress)
    manifest = _assemble(staging, p.header, parts)
    _publish(staging, out, overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def build_part(srcs: list, parts_dir: str, shard_index: int, cfg: Config = Config(), *,
               workers: int | None = None, progress: bool = True) -> dict:
  """Builds shard `shard_index` only, as PARTS_DIR/part-IIIII-of-NNNNN/ (shard + part.json).

  Rerunning a shard (a retried array task) replaces its part with the same bytes.
  """
  if not 0 <= shard_index < cfg.num_shards:
    raise ValueError(f"--shard-index {shard_index}: want 0..{cfg.num_shards - 1} (--num-shards)")
  p = plan(srcs, cfg)
  final = os.path.join(parts_dir, _part_name(shard_index, cfg.num_shards))
  staging = _staging(final)
  try:
    [part] = _run(p, cfg, [shard_index], staging, workers, progress)
    _write_json(os.path.join(staging, PART_FILE), {"header": p.header, "part": part})
    _publish(staging, final, overwrite=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return part


def finalize(parts_dir: str, out: str, *, overwrite: bool = False) -> dict:
  """Assembles every part in `parts_dir` into the dataset at `out`; returns its manifest."""
  out = _check_out(out, overwrite)
  header, parts = _read_parts(parts_dir)
  staging = _staging(out)
  try:
    for part in parts:
      src = os.path.join(parts_dir, _part_name(part["shard"], header["num_shards"]), part["file"])
      if items_lib.sha256_file(src) != part["sha256"]:
        raise DatasetError(f"{src}: checksum differs from its {PART_FILE}; rerun "
                           f"`build --shard-index {part['shard']}` for that part.")
      _link_or_copy(src, os.path.join(staging, part["file"]))
    manifest = _assemble(staging, header, parts)
    _publish(staging, out, overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def summary(manifest: dict) -> str:
  """A short human report: counts per class and source, skipped inputs by reason."""
  lines = [f"{manifest['num_records']} records in {manifest['num_shards']} shard(s), "
           f"{manifest['image_size']} px, crop {manifest['crop']}, detector {manifest['detector']}",
           "  per class: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())]
  for name, s in manifest["sources"].items():
    lines.append(f"  source {name}: read {s['read']}, written {s['written']}, skipped "
                 f"{s['skipped']}, faces found {s['faces_found']}, duplicate CSV rows collapsed "
                 f"{s['duplicate_rows']}")
  by_reason = collections.defaultdict(list)
  for sk in manifest["skipped"]:
    by_reason[sk["reason"].split(":")[0].split(" (")[0]].append(sk["path"])
  if by_reason:
    lines.append(f"  skipped {len(manifest['skipped'])} input(s) (each with its reason in "
                 "manifest.json 'skipped'):")
  for reason, paths in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
    more = f" ... (+{len(paths) - 3})" if len(paths) > 3 else ""
    lines.append(f"    {len(paths):6d}  {reason}: {', '.join(paths[:3])}{more}")
  flagged = manifest.get("flagged", [])
  if flagged:
    lines.append(f"  kept {len(flagged)} corrupt JPEG(s), flagged in manifest.json 'flagged': "
                 + ", ".join(fl["path"] for fl in flagged[:3]) + (" ..." if len(flagged) > 3 else ""))
  return "\n".join(lines)


# ---- per-image work (runs in the pool's worker processes) ----

_STATE: dict = {}


def _die_with_parent() -> None:
  """Linux: the kernel kills this pool worker when the build process dies, SIGKILL included
  (a worker otherwise waits on the pool's queue forever). Elsewhere a no-op."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() == 1:   # the parent died before prctl took effect
    os._exit(1)


def _init_worker(cfg: Config, classes: list[str], tfds_sources: dict, in_pool: bool):
  if in_pool:
    _die_with_parent()
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV threads would oversubscribe
  _STATE.clear()
  _STATE.update(cfg=cfg, label={c: i for i, c in enumerate(classes)}, tfds=tfds_sources,
                detect=faces.make(cfg.detector, cfg.yunet_model), open={})


def _read(item: items_lib.Item) -> tuple[bytes | np.ndarray, str]:
  """The input's encoded bytes (or TFDS's decoded array) and its sha256."""
  if item.pixels is not None:   # FERPlus: grey pixels from its CSV
    side = int(round(len(item.pixels) ** 0.5))
    array = np.frombuffer(item.pixels, np.uint8).reshape(side, side)
    return array, hashlib.sha256(item.pixels).hexdigest()
  if item.tfds_index is None:
    try:
      mode = os.stat(item.path).st_mode
      if stat.S_ISDIR(mode):
        raise images.ImageError("is a directory, not an image file")
      if not stat.S_ISREG(mode):   # a FIFO would block the read forever
        raise images.ImageError("not a regular file (a FIFO, device or socket named like an "
                                "image); only regular files are read")
      with open(item.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      raise images.ImageError(f"missing file: {item.path} does not exist") from None
    except PermissionError:
      raise images.ImageError("unreadable: permission denied") from None
    except OSError as e:
      raise images.ImageError(f"unreadable: {e.strerror or e}") from None
    return data, hashlib.sha256(data).hexdigest()
  src = _STATE["tfds"][item.source]
  if src.name not in _STATE["open"]:
    _STATE["open"][src.name] = src.open()
  example = _STATE["open"][src.name][item.tfds_index]
  if src.image_key not in example:
    raise DatasetError(f"--source tfds {src.dataset}: no feature {src.image_key!r} (features: "
                       f"{sorted(example)}); set image_key=...")
  value = example[src.image_key]
  if isinstance(value, bytes):
    return value, hashlib.sha256(value).hexdigest()
  array = np.ascontiguousarray(value)
  return array, hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def _process(item: items_lib.Item) -> tuple[bytes | None, str | None, str | None, bool,
                                              str | None]:
  """(encoded record or None, skip reason or None, input sha256 or None, face found, the
  corruption a kept record carries or None)."""
  if item.skip:
    return None, item.skip, None, False, None
  cfg, digest, corrupt = _STATE["cfg"], None, None
  try:
    raw, digest = _read(item)
    if isinstance(raw, bytes):
      image, corrupt = images.decode_checked(raw, cfg.keep_corrupt, cfg.max_pixels)
    else:
      image = images.from_array(raw)
    h, w = image.shape[:2]
    images.check_pixels(w, h, cfg.max_pixels)   # formats whose header nothing here reads
    if min(h, w) < cfg.min_size:
      raise images.ImageError(f"too small: {w}x{h} px, shorter side below --min-size "
                              f"{cfg.min_size}")
    landmarks = item.landmarks
    if cfg.detector == "dataset":
      box = faces.clip(item.box, w, h)
      if box is None:
        raise images.ImageError(f"bad box: {item.box} lies outside the {w}x{h} image")
    elif cfg.crop == "align" and landmarks is None and hasattr(_STATE["detect"],
                                                                "with_landmarks"):
      box, landmarks = _STATE["detect"].with_landmarks(image)
    else:
      box = _STATE["detect"](image) if _STATE["detect"] else None
    if cfg.crop == "align":
      if landmarks is None:
        raise images.ImageError("no landmarks: --crop align needs five (the dataset ships none "
                                "for this image and the detector found no face)")
      stored, norm_box = images.align(image, landmarks, box, cfg.margin, cfg.size)
    else:
      stored, norm_box = images.frame(image, box, cfg.crop, cfg.margin, cfg.size)
    jpeg = images.encode_jpeg(stored, cfg.jpeg_quality)
  except images.ImageError as e:
    return None, str(e), digest, False, None
  except cv2.error as e:   # OpenCV failing on one odd image must not end the build
    return None, f"OpenCV failed on this image ({images.one_line(e)})", digest, False, None
  label = records.UNLABELED if item.label is None else _STATE["label"][item.label]
  rec = records.Record(image=jpeg, label=label, box=norm_box, id=item.id, source=item.source,
                       face_found=box is not None, identity=item.identity)
  return records.encode(rec), None, digest, box is not None, corrupt


def _results(p: Plan, cfg: Config, items: list, workers: int | None, progress: bool):
  """Yields `_process(item)` for each item, in order, from a pool of `workers` processes."""
  workers = (os.cpu_count() or 1) if workers is None else workers
  tfds_names = sorted({it.source for it in items if it.tfds_index is not None})
  init = (cfg, p.classes, {n: _tfds_source(p, n) for n in tfds_names})
  bar = tqdm.tqdm(total=len(items), unit="img", file=sys.stderr, disable=not progress,
                  desc="build", smoothing=0.05)
  try:
    if workers <= 1 or len(items) < 2 * _CHUNKSIZE:
      _init_worker(*init, in_pool=False)
      for item in items:
        yield _process(item)
        bar.update()
      return
    # spawn: fork is unsafe under threaded parents (JAX). An executor, not a Pool: a worker
    # that dies (or cannot start) fails the build instead of hanging it.
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=init + (True,)) as pool:
      try:
        for result in pool.map(_process, items, chunksize=_CHUNKSIZE):
          yield result
          bar.update()
      except futures.BrokenExecutor as e:
        raise RuntimeError(
            "a build worker process died or could not start (spawned workers re-import the "
            "calling script: guard it with `if __name__ == '__main__':`, or pass workers=1; "
            "out of memory is the other usual cause).") from e
  finally:
    bar.close()


def _tfds_source(p: Plan, name: str) -> readers.TfdsSource:
  spec = {k: v for k, v in p.header["sources"][name].items() if k != "kind"}
  return readers.TfdsSource(name=name, **spec)


def _run(p: Plan, cfg: Config, shards, out_dir: str, workers: int | None, progress: bool) -> list:
  """Processes the inputs of `shards`, writes their shard files; returns part summaries."""
  os.makedirs(out_dir, exist_ok=True)
  n = len(p.items)
  ranges = [(s, *shard_bounds(n, cfg.num_shards, s)) for s in shards]
  results = _results(p, cfg, [p.items[i] for _, lo, hi in ranges for i in range(lo, hi)],
                     workers, progress)
  try:
    return [_write_shard(p, cfg, shard, lo, hi, results, out_dir) for shard, lo, hi in ranges]
  finally:
    results.close()  # stops the pool now, also when writing failed


def _write_shard(p: Plan, cfg: Config, shard: int, lo: int, hi: int, results, out_dir: str) -> dict:
  """Writes inputs lo..hi (their results come from `results`) as one shard; its summary."""
  name = records.shard_name(shard, cfg.num_shards)
  part = {"shard": shard, "file": name, "ids": [], "skipped": [], "flagged": [],
          "inputs_sha256": {},
          "counts": {c: 0 for c in p.classes + [UNLABELED_KEY]},
          "sources": {s: dict.fromkeys(("read", "written", "skipped", "faces_found",
                                        "duplicate_rows"), 0) for s in p.header["sources"]},
          "partitions": {}, "labels": {}}
  writer = ArrayRecordWriter(os.path.join(out_dir, name), WRITER_OPTIONS)
  for i in range(lo, hi):
    item = p.items[i]
    raw, reason, digest, face_found, corrupt = next(results)
    stats = part["sources"][item.source]
    stats["read"] += 1
    if item.original_label is not None:   # the dataset's own word, and what it became
      seen = part["labels"].setdefault(item.source, {}).setdefault(
          item.original_label, {"class": item.label, "read": 0, "written": 0})
      seen["read"] += 1
      seen["written"] += int(raw is not None)
    stats["duplicate_rows"] += item.rows - 1
    if digest is not None:
      part["inputs_sha256"][item.id] = digest
    if raw is None:
      stats["skipped"] += 1
      part["skipped"].append({"id": item.id, "source": item.source, "path": item.path,
                              "reason": reason})
      continue
    writer.write(raw)
    if corrupt:
      part["flagged"].append({"id": item.id, "source": item.source, "path": item.path,
                              "reason": f"corrupt JPEG data, kept (--keep-corrupt): {corrupt}"})
    stats["written"] += 1
    stats["faces_found"] += int(face_found)
    part["ids"].append(item.id)
    part["counts"][UNLABELED_KEY if item.label is None else item.label] += 1
    if item.partition is not None:
      part["partitions"].setdefault(item.partition, []).append(item.id)
  writer.close()
  part["num_records"] = len(part["ids"])
  part["sha256"] = items_lib.sha256_file(os.path.join(out_dir, name))
  return part


# ---- assembly and publishing ----

def _assemble(out_dir: str, header: dict, parts: list) -> dict:
  """Writes ids.txt and (last) manifest.json into `out_dir`, after reconciling counts."""
  parts = sorted(parts, key=lambda part: part["shard"])
  ids = [rid for part in parts for rid in part["ids"]]
  ids_text = "".join(rid + "\n" for rid in ids)
  with open(os.path.join(out_dir, records.IDS_FILE), "w", encoding="utf-8", newline="") as f:
    f.write(ids_text)
  manifest = dict(header)
  manifest["sources"] = {name: dict(spec) for name, spec in header["sources"].items()}
  for name, spec in manifest["sources"].items():
    for key in parts[0]["sources"][name]:
      spec[key] = sum(part["sources"][name][key] for part in parts)
    if spec["read"] != spec["written"] + spec["skipped"]:
      raise RuntimeError(f"source {name}: read {spec['read']} != written {spec['written']} + "
                         f"skipped {spec['skipped']}; this is a bug, please report it.")
  partitions = {}
  for part in parts:
    for name, ids_of in part.get("partitions", {}).items():
      partitions.setdefault(name, []).extend(ids_of)
    for source, labels in part.get("labels", {}).items():
      merged = manifest["sources"][source].setdefault("label_map", {})
      for original, seen in labels.items():
        into = merged.setdefault(original, {"class": seen["class"], "read": 0, "written": 0})
        into["read"] += seen["read"]
        into["written"] += seen["written"]
  if partitions:   # the dataset's own lists: `split` takes test (and val) from here
    for name, spec in manifest["sources"].items():
      spec["partitions"] = {p: sum(1 for rid in partitions[p] if rid.startswith(name + "/"))
                            for p in sorted(partitions)}
    manifest["partitions"] = {p: ids_of for p, ids_of in sorted(partitions.items())
                              if p != "train"}
  counts = {c: sum(part["counts"][c] for part in parts) for c in parts[0]["counts"]}
  if sum(counts.values()) != len(ids) or len(set(ids)) != len(ids):
    raise RuntimeError("record counts or ids do not reconcile; this is a bug, please report it.")
  manifest.update(
      num_records=len(ids),
      counts=counts,
      shards=[{k: part[k] for k in ("file", "num_records", "sha256")} for part in parts],
      ids_sha256=hashlib.sha256(ids_text.encode()).hexdigest(),
      skipped=[sk for part in parts for sk in part["skipped"]],
      flagged=[fl for part in parts for fl in part.get("flagged", [])],
      inputs_sha256={k: v for part in parts for k, v in part["inputs_sha256"].items()},
  )
  manifest["manifest_sha256"] = records.manifest_digest(manifest)
  _write_json(os.path.join(out_dir, records.MANIFEST), manifest)
  return manifest


def _read_parts(parts_dir: str) -> tuple[dict, list]:
  if not os.path.isdir(parts_dir):
    raise DatasetError(f"--parts-dir {parts_dir}: not a directory; build parts into it first "
                       "with `build --shard-index I --parts-dir DIR`.")
  found = {}
  for name in sorted(os.listdir(parts_dir)):
    m = _PART_DIR.match(name)
    if m and os.path.exists(os.path.join(parts_dir, name, PART_FILE)):
      with open(os.path.join(parts_dir, name, PART_FILE)) as f:
        found[(int(m.group(1)), int(m.group(2)))] = json.load(f)
  if not found:
    raise DatasetError(f"--parts-dir {parts_dir}: no finished parts (part-IIIII-of-NNNNN/"
                       f"{PART_FILE}); build them with `build --shard-index I --parts-dir DIR`.")
  header = next(iter(found.values()))["header"]
  n = header["num_shards"]
  if any(total != n or part["header"] != header for (_, total), part in found.items()):
    raise DatasetError(f"--parts-dir {parts_dir}: parts were built with different options or "
                       "inputs; rebuild all parts with one command line (only --shard-index "
                       "differs).")
  missing = [i for i in range(n) if (i, n) not in found]
  if missing:
    raise DatasetError(f"--parts-dir {parts_dir}: parts {missing[:20]} of {n} are missing; run "
                       f"`build --shard-index I` for them, then finalize again.")
  return header, [found[(i, n)]["part"] for i in range(n)]


def _check_out(out: str, overwrite: bool) -> str:
  out = os.path.normpath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose "
                          "another directory.")
  _check_replaceable(out)
  return out


def _check_replaceable(out: str) -> None:
  """--overwrite replaces datasets (a manifest.json, or a shard part's part.json), or an
  empty directory; never any other directory or file."""
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out) or os.path.islink(out):
    raise FileExistsError(f"--out {out} exists and is not a directory; --overwrite replaces "
                          "only datasets. Choose another --out.")
  entries = os.listdir(out)
  if entries and records.MANIFEST not in entries and PART_FILE not in entries:
    raise FileExistsError(f"--out {out} is not a dataset (no {records.MANIFEST}) and not "
                          "empty; --overwrite replaces only datasets. Choose another --out.")


def _staging(final: str) -> str:
  """A fresh directory next to `final` (same file system, so the last rename is atomic)."""
  staging = f"{final}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  return staging


def _publish(staging: str, final: str, overwrite: bool):
  if not os.path.exists(final):
    os.rename(staging, final)
    return
  if not overwrite:
    raise FileExistsError(f"{final} appeared while building; nothing was replaced. Pass "
                          "--overwrite to replace it.")
  _check_replaceable(final)
  old = f"{final}.old-{os.getpid()}"
  os.rename(final, old)
  os.rename(staging, final)
  shutil.rmtree(old)


def _write_json(path: str, obj: dict):
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")


def _link_or_copy(src: str, dst: str):
  try:
    os.link(src, dst)
  except OSError:  # across file systems, or links not supported
    shutil.copyfile(src, dst)


def _part_name(shard: int, num_shards: int) -> str:
  return f"part-{shard:05d}-of-{num_shards:05d}"
