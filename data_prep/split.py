"""`python -m data_prep split`: record-id lists over one build, written once, read by every stage.

Both fine-tuning stages read train_labeled from the same file, so the labeled subset is
fixed per split name (the published SSFER code re-draws it per stage; we do not).
Lists are chosen per class (stratified) and, with `group_by`, whole identities at a time,
so one person never appears in two lists. Same build + same options = identical file.
`kfold` writes K such files, NAME_fold0.json ... NAME_fold{K-1}.json, for cross-validation.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import re
import warnings

from array_record.python.array_record_module import ArrayRecordReader

from data_prep.build import UNLABELED_KEY
from ssfer_jax.errors import DatasetError
from ssfer_jax.input import records


@dataclasses.dataclass(frozen=True)
class Options:
  """One of labeled_fraction / labels_per_class / labels_total picks train_labeled; val and
  test are per-class fractions of the labeled records, or test is a whole source."""
  labeled_fraction: float | None = None
  labels_per_class: int | None = None
  labels_total: int | None = None
  val_fraction: float = 0.1
  test_fraction: float | None = None  # default 0.1, or 0 with test_source
  test_source: str | None = None
  group_by: str | None = None         # regex on the basename (group 1), or "identity"
  group_min_match: float = 0.9        # refuse a group_by that matches fewer record ids
  group_fill: str = "first_fit"       # or "best": closer to per-class targets with identities
  partition: str = "dataset"          # the build's own train/val/test, where it has one; "ignore"
  merge_val: bool = False             # the dataset's val joins test (the paper's FERPlus)
  label_noise: float = 0.0            # share of train_labeled given another class (symmetric)
  seed: int = 0

  def check(self):
    if self.partition not in ("dataset", "ignore"):
      raise ValueError(f"--partition {self.partition!r}: want dataset or ignore")
    if self.group_fill not in FILLS:
      raise ValueError(f"--group-fill {self.group_fill!r}: want one of {FILLS}")
    if not 0 <= self.label_noise < 1:
      raise ValueError(f"--label-noise {self.label_noise}: want 0 <= rate < 1")
    picked = [n for n in ("labeled_fraction", "labels_per_class", "labels_total")
              if getattr(self, n) is not None]
    if len(picked) != 1:
      raise ValueError("give exactly one of --labeled-fraction, --labels-per-class, "
                       f"--labels-total (got {picked or 'none'})")
    if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
      raise ValueError(f"--labeled-fraction {self.labeled_fraction}: want 0 < p <= 1")
    for n in ("labels_per_class", "labels_total"):
      if getattr(self, n) is not None and getattr(self, n) < 1:
        raise ValueError(f"--{n.replace('_', '-')} {getattr(self, n)}: want >= 1")
    if self.test_source is not None and self.test_fraction:
      raise ValueError("--test-source and --test-fraction exclude each other")
    if min(self.val_fraction, self.test_frac) < 0 or self.val_fraction + self.test_frac >= 1:
      raise ValueError(f"--val-fraction {self.val_fraction} + --test-fraction {self.test_frac} "
                       "must each be >= 0 and sum to less than 1")
    _check_group_by(self.group_by)

  @property
  def test_frac(self) -> float:
    if self.test_fraction is not None:
      return self.test_fraction
    return 0.0 if self.test_source is not None else 0.1


@dataclasses.dataclass(frozen=True)
class FoldOptions:
  """K-fold cross-validation (SSFER Table 5: K models, mean +- std). Fold k's test list is
  fold k, so every labeled record is tested exactly once; val is a per-class fraction of the
  other K-1 folds and train_labeled the rest of them (all labeled: no labeled-subset option)."""
  folds: int
  val_fraction: float = 0.1
  group_by: str | None = None         # regex on the basename; group 1 is the identity
  group_min_match: float = 0.9        # refuse a group_by that matches fewer record ids
  seed: int = 0

  def check(self):
    if self.folds < 2:
      raise ValueError(f"--folds {self.folds}: want >= 2")
    if not 0 <= self.val_fraction < 1:
      raise ValueError(f"--val-fraction {self.val_fraction}: want 0 <= f < 1 (of the K-1 "
                       "training folds)")
    _check_group_by(self.group_by)


FILLS = ("first_fit", "best")
IDENTITY = "identity"   # --group-by identity: the record's own identity field


def _check_group_by(pattern: str | None):
  if pattern is None or pattern == IDENTITY:
    return
  try:
    if re.compile(pattern).groups < 1:
      raise ValueError(f"--group-by {pattern!r}: needs a capture group, e.g. "
                       r"'^(.*)_\d+\.\w+$'")
  except re.error as e:
    raise ValueError(f"--group-by {pattern!r}: not a regular expression ({e})") from e


class SplitWarning(UserWarning):
  """A class that val or test holds none of."""


def check_group_matches(recs: list["RecordInfo"], pattern: str | None,
                        min_match: float) -> int | None:
  """How many record ids `pattern` finds an identity in; ValueError below `min_match` of
  them: an id the pattern misses is its own identity, so a typo would silently write an
  ungrouped split (the same person in train and test)."""
  if pattern is None:
    return None
  if pattern == IDENTITY:
    matched = sum(1 for r in recs if r.identity)
    if matched < min_match * len(recs):
      raise ValueError(
          f"--group-by identity: only {matched} of {len(recs)} records carry an identity (a "
          "folder source with labels=identity sets it); give a --group-by regex instead, or "
          "lower --group-min-match to accept.")
    return matched
  regex = re.compile(pattern)
  matched = sum(1 for r in recs if regex.search(r.id.rsplit("/", 1)[-1]))
  if matched < min_match * len(recs):
    example = recs[0].id.rsplit("/", 1)[-1] if recs else "?"
    raise ValueError(
        f"--group-by {pattern!r} finds an identity in {matched} of {len(recs)} record ids "
        f"({100 * matched / max(len(recs), 1):.0f}%, want >= {100 * min_match:.0f}%); the rest "
        f"would be ungrouped, leaking identities across lists. The pattern is searched in the "
        f"file name (e.g. {example!r}) and group 1 is the identity; fix it, or lower "
        "--group-min-match to accept.")
  return matched


def _empty_classes(result: dict, lists: tuple[str, ...]) -> list[str]:
  """'class c has no val records' lines for classes the build labels but a list lacks."""
  labeled = {c for ln, counts in result["counts"].items() for c, n in counts.items()
             if n and c != UNLABELED_KEY}
  return [f"{result['name']}: class {c!r} has no {ln} records (too few labeled, or its "
          "identities went elsewhere); its per-class figures there will be empty."
          for ln in lists if ln in result["counts"]
          for c in sorted(labeled) if not result["counts"][ln].get(c)]


@dataclasses.dataclass(frozen=True)
class RecordInfo:
  id: str
  label: int
  source: str
  identity: str = ""
  partition: str | None = None   # "val" / "test" of the dataset's own partition


def read_records(data_dir: str) -> list[RecordInfo]:
  """Every record's id, label, source, identity and own partition, in global order; checks
  ids.txt against the shards."""
  manifest = records.load_manifest(data_dir)
  partition_of = {rid: p for p, ids in manifest.get("partitions", {}).items() for rid in ids}
  out = []
  for path in records.shard_paths(data_dir, manifest):
    reader = ArrayRecordReader(path)
    n = reader.num_records()
    for lo in range(0, n, 1024):
      for raw in reader.read(list(range(lo, min(n, lo + 1024)))):
        d = records.decode(raw)
        out.append(RecordInfo(d["id"], d["label"], d["source"], d["identity"],
                              partition_of.get(d["id"])))
    reader.close()
  if [r.id for r in out] != records.load_ids(data_dir):
    raise DatasetError(f"{os.path.join(data_dir, records.IDS_FILE)} does not match the shards; "
                       "rebuild the dataset with `python -m data_prep build`.")
  return out


def split(data_dir: str, name: str, opts: Options, *, overwrite: bool = False) -> dict:
  """Writes DATA_DIR/splits/NAME.json and returns its content."""
  opts.check()
  path = _split_path(data_dir, name)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another "
                          "--name (training runs may depend on this one).")
  manifest = records.load_manifest(data_dir)
  recs = read_records(data_dir)
  if opts.test_source is not None and opts.test_source not in manifest["sources"]:
    raise ValueError(f"--test-source {opts.test_source!r}: the build has sources "
                     f"{sorted(manifest['sources'])}")
  partitioned = opts.partition == "dataset" and bool(manifest.get("partitions"))
  if partitioned and (opts.test_fraction or opts.test_source):
    raise ValueError(f"{data_dir} has its dataset's own test partition ("
                     f"{', '.join(f'{p} {len(v)}' for p, v in manifest['partitions'].items())} "
                     "records), which becomes the test list: drop --test-fraction/--test-source, "
                     "or pass --partition ignore to draw lists from every record.")
  if not partitioned:
    recs = [dataclasses.replace(r, partition=None) for r in recs]
  matched = check_group_matches(recs, opts.group_by, opts.group_min_match)
  lists, targets = assign(recs, opts)
  options = dict(dataclasses.asdict(opts), test_fraction=0.0 if partitioned else opts.test_frac)
  if partitioned and "val" in manifest["partitions"] and not opts.merge_val:
    options["val_fraction"] = 0.0   # val is the dataset's own, not drawn
  result = _content(manifest, recs, name, options, lists)
  result["targets"] = {ln: {manifest["classes"][c]: n for c, n in sorted(t.items())}
                       for ln, t in targets.items()}
  if matched is not None:
    result["group_by_matched"] = {"ids": matched, "of": len(recs)}
  if opts.label_noise:
    result["noisy_labels"] = noisy_labels(recs, lists["train_labeled"], manifest["classes"],
                                          opts.label_noise, opts.seed)
  wanted = tuple(ln for ln, f in (("val", opts.val_fraction), ("test", options["test_fraction"]))
                 if f)
  for msg in _empty_classes(result, wanted + (("test",) if opts.test_source else ())):
    warnings.warn(msg, SplitWarning, stacklevel=2)
  _write(path, result)
  return result


def fold_name(name: str, fold: int) -> str:
  """The split name of fold `fold` of the K-fold set NAME (pass it to records.load_split)."""
  return f"{name}_fold{fold}"


class FoldWarning(UserWarning):
  """A class that some fold tests none of, or trains on none of."""


def kfold(data_dir: str, name: str, opts: FoldOptions, *, overwrite: bool = False) -> list[dict]:
  """Writes DATA_DIR/splits/NAME_fold{k}.json for k < K and returns their content.

  The K files are one set: any existing NAME_fold*.json blocks the write unless `overwrite`,
  which also deletes the set's leftover files (from a run with more folds).
  """
  opts.check()
  paths = [_split_path(data_dir, fold_name(name, k)) for k in range(opts.folds)]
  old = _fold_files(data_dir, name)
  if old and not overwrite:
    raise FileExistsError(f"{old[0]} exists; pass --overwrite to replace the fold set {name!r}, "
                          "or choose another --name (training runs may depend on this one).")
  manifest = records.load_manifest(data_dir)
  recs = read_records(data_dir)
  check_group_matches(recs, opts.group_by, opts.group_min_match)
  results = [_content(manifest, recs, fold_name(name, k),
                      dict(dataclasses.asdict(opts), fold=k), lists)
             for k, lists in enumerate(assign_folds(recs, opts))]
  for msg in _thin_classes(results, opts):
    warnings.warn(msg, FoldWarning, stacklevel=2)
  for path, result in zip(paths, results):
    _write(path, result)
  for path in old:
    if path not in paths:
      os.remove(path)
  return results


def fold_names(data_dir: str, name: str) -> list[str]:
  """The split names NAME_fold0 ... NAME_fold{K-1} of a K-fold set, K read from fold 0;
  checks that all K files exist and come from one `kfold` call."""
  first = _split_path(data_dir, fold_name(name, 0))
  if not os.path.exists(first):
    records.load_manifest(data_dir)  # a missing build is said first: build, then split
    raise DatasetError(f"{first} not found; write the fold set with `python -m data_prep split "
                       f"--data {data_dir} --name {name} --folds K`.")
  with open(first) as f:
    want = json.load(f)
  if "folds" not in want.get("options", {}):
    raise DatasetError(f"{first} is not a fold file (no options.folds); was it written by "
                       "`python -m data_prep split --folds`?")
  out = []
  for k in range(want["options"]["folds"]):
    path = _split_path(data_dir, fold_name(name, k))
    if not os.path.exists(path):
      raise DatasetError(f"{path} not found but {first} says {want['options']['folds']} folds; "
                         "rewrite the set with `python -m data_prep split ... --overwrite`.")
    with open(path) as f:
      got = json.load(f)
    if (got["manifest_sha256"] != want["manifest_sha256"]
        or dict(got["options"], fold=0) != want["options"] or got["options"]["fold"] != k):
      raise DatasetError(f"{path} and {first} come from different `split --folds` runs; "
                         "rewrite the set with `--overwrite`.")
    out.append(fold_name(name, k))
  return out


def _fold_files(data_dir: str, name: str) -> list[str]:
  """Existing files of the fold set NAME, in fold order."""
  d = os.path.join(data_dir, records.SPLITS_DIR)
  pattern = re.compile(re.escape(name) + r"_fold(\d+)\.json")
  found = [(int(m.group(1)), f) for f in (os.listdir(d) if os.path.isdir(d) else [])
           for m in [pattern.fullmatch(f)] if m]
  return [os.path.join(d, f) for _, f in sorted(found)]


def _split_path(data_dir: str, name: str) -> str:
  if not name or os.sep in name or name.startswith("."):
    raise ValueError(f"split name {name!r}: want a plain file name such as 'p10_seed0'")
  return os.path.join(data_dir, records.SPLITS_DIR, name + ".json")


def _content(manifest: dict, recs: list[RecordInfo], name: str, options: dict,
             lists: dict[str, list[str]]) -> dict:
  """A split file: the lists, pinned to the build, with per-list per-class counts."""
  names = manifest["classes"] + [UNLABELED_KEY]  # label -1 indexes the last entry
  label_of = {r.id: r.label for r in recs}
  counts = {ln: dict.fromkeys(names, 0) for ln in lists}
  for ln, ids in lists.items():
    for i in ids:
      counts[ln][names[label_of[i]]] += 1
  return {"manifest_sha256": manifest["manifest_sha256"], "name": name, "options": options,
          "lists": lists, "counts": counts}


def _write(path: str, result: dict):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.partial-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def assign(recs: list[RecordInfo], opts: Options
           ) -> tuple[dict[str, list[str]], dict[str, dict[int, int]]]:
  """The four disjoint lists (ids in global record order) that together cover `recs`, and
  the per-class targets of the drawn ones (val, test, train_labeled).

  Records of the dataset's own val/test partition (`RecordInfo.partition`) go there as they
  are; val (unless the dataset has one) and the labeled subset are drawn from the rest."""
  rng = random.Random(opts.seed)
  group_of = _grouper(opts.group_by)
  fill = _fill if opts.group_fill == "first_fit" else _fill_best
  # The dataset's own val/test first: no identity pull may move them elsewhere.
  own = {r.partition for r in recs if r.partition}
  fixed = {r.id: "test" if opts.merge_val else r.partition for r in recs if r.partition}
  where, labeled = _settled([r for r in recs if not r.partition], group_of, opts.test_source)
  where.update(fixed)
  held = {"test": opts.test_frac if opts.test_source is None and not own else 0.0,
          "val": 0.0 if "val" in own and not opts.merge_val else opts.val_fraction}
  per_class = collections.Counter(r.label for r in labeled)
  targets = {ln: {c: round(f * n) for c, n in per_class.items()} for ln, f in held.items() if f}
  pool = fill(_groups(labeled, group_of), targets, "train", rng, where)
  pool_counts = collections.Counter(r.label for r in pool)
  targets["train_labeled"] = labeled_targets(pool_counts, opts)
  fill(_groups(pool, group_of), {"train_labeled": targets["train_labeled"]},
       "train_unlabeled", rng, where)
  return _lists(recs, where), targets


def noisy_labels(recs: list[RecordInfo], train_labeled: list[str], classes: list[str],
                 rate: float, seed: int) -> dict[str, int]:
  """Symmetric label noise for the paper's Table 8: exactly round(rate x n) train_labeled
  records (seeded) each get one of the other classes, uniformly. The split file keeps them
  ({id: class index}); the input pipeline reads these labels in place of the records'."""
  label_of = {r.id: r.label for r in recs}
  rng = random.Random(f"{seed}/label_noise")
  chosen = sorted(rng.sample(sorted(train_labeled), round(rate * len(train_labeled))))
  if len(classes) < 2 and chosen:
    raise ValueError("--label-noise needs at least two classes")
  return {rid: rng.choice([c for c in range(len(classes)) if c != label_of[rid]])
          for rid in chosen}


def assign_folds(recs: list[RecordInfo], opts: FoldOptions) -> list[dict[str, list[str]]]:
  """Fold k's four disjoint lists (ids in global record order) for every k; each covers `recs`.

  The labeled records are dealt into K folds (`_deal`); fold k is test, val is drawn per
  class (and per identity) from the other folds like `assign`'s val, train_labeled is the
  rest. train_unlabeled is the same in every fold: the unlabeled records, plus (with
  group_by) the labeled records of identities that also have unlabeled ones, as in `assign`.
  """
  group_of = _grouper(opts.group_by)
  fixed, labeled = _settled(recs, group_of)
  groups = _groups(labeled, group_of)
  if len(groups) < opts.folds:
    what = "identities" if opts.group_by else "records"
    raise ValueError(f"--folds {opts.folds}: only {len(groups)} labeled {what} to split "
                     "(outside identities seen unlabeled); want --folds <= that")
  fold_of = _deal(groups, opts.folds, random.Random(opts.seed))
  out = []
  for k in range(opts.folds):
    where = dict(fixed)
    pool = []
    for g, rs in groups.items():
      if fold_of[g] == k:
        where.update((r.id, "test") for r in rs)
      else:
        pool.extend(rs)
    per_class = collections.Counter(r.label for r in pool)
    targets = {c: round(opts.val_fraction * n) for c, n in per_class.items()}
    _fill(_groups(pool, group_of), {"val": targets}, "train_labeled",
          random.Random(f"{opts.seed}/fold{k}"), where)
    out.append(_lists(recs, where))
  return out


def _settled(recs: list[RecordInfo], group_of, test_source: str | None = None
             ) -> tuple[dict[str, str], list[RecordInfo]]:
  """The list of every record that needs no drawing (id -> list), and the labeled rest."""
  where = {r.id: "train_unlabeled" for r in recs if r.label == records.UNLABELED}
  # Identities already committed to a list pull their labeled records along: those of the
  # test source into test, those seen unlabeled into train_unlabeled (without group_by
  # every record is its own identity, so this only moves the test source's records).
  test_groups = {group_of(r) for r in recs if r.source == test_source and
                 r.label != records.UNLABELED}
  unlabeled_groups = {group_of(r) for r in recs if r.label == records.UNLABELED}
  labeled = []
  for r in recs:
    if r.label == records.UNLABELED:
      continue
    g = group_of(r)
    if g in test_groups or g in unlabeled_groups:
      where[r.id] = "test" if g in test_groups else "train_unlabeled"
    else:
      labeled.append(r)
  return where, labeled


def _lists(recs: list[RecordInfo], where: dict[str, str]) -> dict[str, list[str]]:
  lists = {ln: [] for ln in records.SPLIT_NAMES}
  for r in recs:
    lists[where[r.id]].append(r.id)
  return lists


def _deal(groups: dict[str, list[RecordInfo]], k: int, rng: random.Random) -> dict[str, int]:
  """The fold of every group. Largest groups first (ties in seeded random order), each to the
  fold it unbalances least (the rise of sum_c (n_fc - n_c/K)^2 / (n_c/K)), then the smaller
  fold, then the lower index.

  A one-record group thus goes to a fold holding the fewest of its class, so without
  grouping per-class fold counts differ by at most 1; with identities they are close, not
  exact. Each of the first K groups lands in an empty fold, so no fold is empty.
  """
  share = {c: n / k for c, n in
           collections.Counter(r.label for rs in groups.values() for r in rs).items()}
  load = [collections.Counter() for _ in range(k)]
  size = [0] * k
  order = sorted(groups)
  rng.shuffle(order)
  order.sort(key=lambda g: -len(groups[g]))  # stable: equal sizes keep the random order
  fold_of = {}
  for g in order:
    count = collections.Counter(r.label for r in groups[g])

    def cost(f):
      return sum(m * (2 * (load[f][c] - share[c]) + m) / share[c] for c, m in count.items())
    f = min(range(k), key=lambda f: (cost(f), size[f], f))
    fold_of[g] = f
    load[f].update(count)
    size[f] += len(groups[g])
  return fold_of


def _thin_classes(results: list[dict], opts: FoldOptions) -> list[str]:
  """Why some folds cannot score a class: it is in no test list, or in no train_labeled."""
  msgs = []
  k = len(results)
  for c in results[0]["counts"]["test"]:
    n = sum(r["counts"]["test"][c] for r in results)
    if n == 0:
      continue  # unlabeled, or a class with no records to deal
    for ln, what in (("test", "score no"), ("train_labeled", "learn no")):
      none = [f for f, r in enumerate(results) if r["counts"][ln][c] == 0]
      if none:
        msgs.append(f"class {c!r} ({n} labeled records) is in no {ln} list of fold(s) "
                    f"{', '.join(map(str, none))} of --folds {k}"
                    + (" (identities stay whole)" if opts.group_by else "")
                    + f": those folds {what} {c}. Use fewer --folds, or more data of that "
                    "class, if per-class figures matter.")
  return msgs


def labeled_targets(counts: dict[int, int], opts: Options) -> dict[int, int]:
  """How many labeled training records each class gets."""
  if opts.labeled_fraction is not None:
    return {c: max(1, round(opts.labeled_fraction * n)) for c, n in counts.items()}
  if opts.labels_per_class is not None:
    return {c: min(opts.labels_per_class, n) for c, n in counts.items()}
  return proportional(counts, opts.labels_total)


def proportional(counts: dict[int, int], total: int) -> dict[int, int]:
  """`total` split over classes in proportion to `counts`, at least 1 each, summing exactly
  to `total` (largest remainders; ties to the lower class index)."""
  classes = sorted(c for c, n in counts.items() if n > 0)
  n = sum(counts[c] for c in classes)
  if not len(classes) <= total <= n:
    raise ValueError(f"--labels-total {total}: want between {len(classes)} (one per class) and "
                     f"{n} (the labeled training pool)")
  quota = {c: total * counts[c] / n for c in classes}
  alloc = {c: min(counts[c], max(1, math.floor(quota[c]))) for c in classes}
  while sum(alloc.values()) < total:
    c = max((c for c in classes if alloc[c] < counts[c]), key=lambda c: (quota[c] - alloc[c], -c))
    alloc[c] += 1
  while sum(alloc.values()) > total:
    c = max((c for c in classes if alloc[c] > 1), key=lambda c: (alloc[c] - quota[c], -c))
    alloc[c] -= 1
  return alloc


def _grouper(pattern: str | None):
  regex = re.compile(pattern) if pattern and pattern != IDENTITY else None

  def group_of(rec: RecordInfo) -> str:
    if pattern == IDENTITY:
      return f"identity:{rec.identity}" if rec.identity else rec.id
    if regex is None:
      return rec.id
    m = regex.search(rec.id.rsplit("/", 1)[-1])
    return f"group:{m.group(1)}" if m else rec.id
  return group_of


def _groups(recs: list[RecordInfo], group_of) -> dict[str, list[RecordInfo]]:
  groups = collections.defaultdict(list)
  for r in recs:
    groups[group_of(r)].append(r)
  return groups


def _fill(groups: dict[str, list[RecordInfo]], targets: dict[str, dict[int, int]], rest: str,
          rng: random.Random, where: dict[str, str]) -> list[RecordInfo]:
  """Assigns whole groups, in seeded random order, to the first list (in `targets` order)
  they fit in without exceeding any class target; the rest go to `rest` (and are returned).

  Single-record groups hit every target exactly; with identities, a class whose target no
  group fits gets the group that overshoots the targets least, so no list that wants a class
  lacks it.
  """
  order = sorted(groups)
  rng.shuffle(order)
  need = {ln: dict(t) for ln, t in targets.items()}
  placed = {}
  for g in order:
    count = collections.Counter(r.label for r in groups[g])
    for ln, want in need.items():
      if all(want.get(c, 0) >= k for c, k in count.items()):
        placed[g] = ln
        for c, k in count.items():
          want[c] -= k
        break
  for ln, want in need.items():
    for c in sorted(c for c, k in want.items() if k > 0 and k == targets[ln][c]):
      spare = [g for g in order if g not in placed and any(r.label == c for r in groups[g])]
      if spare:
        g = min(spare, key=lambda g: (_overshoot(groups[g], want), len(groups[g])))
        placed[g] = ln
        for r in groups[g]:
          want[r.label] = want.get(r.label, 0) - 1
  rest_recs = []
  for g in order:
    ln = placed.get(g, rest)
    where.update((r.id, ln) for r in groups[g])
    if ln == rest:
      rest_recs.extend(groups[g])
  return sorted(rest_recs, key=lambda r: r.id)


def _fill_best(groups: dict[str, list[RecordInfo]], targets: dict[str, dict[int, int]],
               rest: str, rng: random.Random, where: dict[str, str]) -> list[RecordInfo]:
  """`_fill`, then local search on the total miss sum_l sum_c |n_lc - target_lc|: move one
  group to another list (or `rest`), or swap two groups between lists, while that lowers
  the miss, never emptying a list of a class it wants. Never worse than first fit; closer
  when a class lives in a few big identities (first fit must then overshoot). Swaps are
  tried up to `_SWAP_LIMIT` groups.""" 
  trial = {}
  _fill(groups, targets, rest, rng, trial)
  order = sorted(groups)
  counts = {g: collections.Counter(r.label for r in groups[g]) for g in order}
  placed = {g: trial[groups[g][0].id] for g in order}
  have = {ln: collections.Counter() for ln in targets}
  for g in order:
    if placed[g] != rest:
      have[placed[g]].update(counts[g])

  lacking = 1 + sum(len(rs) for rs in groups.values())   # outweighs any count miss

  def cost(n, want):   # a list that wants a class never loses its last record of it
    return abs(n - want) + (lacking if want > 0 and n <= 0 else 0)

  def delta(ln, change):   # the cost's change when list ln's counts change by `change`
    if ln == rest:
      return 0
    want, got = targets[ln], have[ln]
    return sum(cost(got[c] + k, want.get(c, 0)) - cost(got[c], want.get(c, 0))
               for c, k in change.items())

  def shift(g, to):
    if placed[g] != rest:
      have[placed[g]].subtract(counts[g])
    placed[g] = to
    if to != rest:
      have[to].update(counts[g])

  lists = list(targets) + [rest]
  for _ in range(len(order) + 1):   # each pass lowers the (integer) miss, or stops
    improved = False
    for g in order:
      here, minus = placed[g], {c: -k for c, k in counts[g].items()}
      gains = [(delta(here, minus) + delta(ln, counts[g]), ln) for ln in lists if ln != here]
      best, to = min(gains, key=lambda t: (t[0], lists.index(t[1])))
      if best < 0:
        shift(g, to)
        improved = True
    if len(order) <= _SWAP_LIMIT:
      for g in order:
        for h in order:
          a, b = placed[g], placed[h]
          if a == b or (a == rest and b == rest):
            continue
          move = collections.Counter(counts[h])
          move.subtract(counts[g])   # list a loses g, gains h; list b the opposite
          back = {c: -k for c, k in move.items()}
          if delta(a, move) + delta(b, back) < 0:
            shift(g, b)
            shift(h, a)
            improved = True
    if not improved:
      break
  rest_recs = []
  for g in order:
    where.update((r.id, placed[g]) for r in groups[g])
    if placed[g] == rest:
      rest_recs.extend(groups[g])
  return sorted(rest_recs, key=lambda r: r.id)


_SWAP_LIMIT = 2000


def _overshoot(group: list[RecordInfo], want: dict[int, int]) -> int:
  count = collections.Counter(r.label for r in group)
  return sum(max(0, k - want.get(c, 0)) for c, k in count.items())


def table(result: dict) -> str:
  """The per-list, per-class count table printed after a split."""
  counts = result["counts"]
  cols = list(next(iter(counts.values())))
  width = max(8, *(len(c) for c in cols))
  head = f"{'list':16s}" + "".join(f"{c:>{width + 1}s}" for c in cols) + f"{'total':>{width + 1}s}"
  lines = [head]
  for ln in records.SPLIT_NAMES:
    row = counts[ln]
    lines.append(f"{ln:16s}" + "".join(f"{row[c]:>{width + 1}d}" for c in cols)
                 + f"{sum(row.values()):>{width + 1}d}")
    target = result.get("targets", {}).get(ln)
    if target and any(target.get(c, 0) != row[c] for c in target):   # grouped draws miss
      lines.append(f"{'  target':16s}" + "".join(
          f"{target[c]:>{width + 1}d}" if c in target else " " * (width + 1) for c in cols)
          + f"{sum(target.values()):>{width + 1}d}")
  if result.get("noisy_labels"):
    lines.append(f"label noise: {len(result['noisy_labels'])} of {sum(counts['train_labeled'].values())} "
                 "train_labeled records carry another class (listed in the split file)")
  return "\n".join(lines)
