"""`data_prep split` over a real build: disjoint, complete, stratified, grouped, seeded."""

import collections
import json
import pathlib
import re
import subprocess
import sys

import hypothesis
import pytest
from hypothesis import strategies as st

from data_prep import __main__ as cli
from data_prep import build, readers, split
from ssfer_jax import errors
from ssfer_jax.input import records

IDENTITY = r"^(.*)_\d+\.\w+$"


@pytest.fixture(scope="module")
def data(demo_data_dir, tmp_path_factory):
  """The whole demo set (labeled) plus an unlabeled folder and a second labeled source."""
  tmp = tmp_path_factory.mktemp("split")
  unl = tmp / "unlabeled"
  unl.mkdir()
  extra = sorted((demo_data_dir / "images").glob("A*_0001.jpg"))
  for p in extra[:10]:
    (unl / p.name).write_bytes(p.read_bytes())
  held = tmp / "held" / "neutral"
  held.mkdir(parents=True)
  for p in extra[10:20]:
    (held / p.name).write_bytes(p.read_bytes())
  srcs = [readers.CsvSource("demo", str(demo_data_dir / "labels.csv"),
                            root=str(demo_data_dir / "images")),
          readers.FolderSource("web", str(unl), "none"),
          readers.FolderSource("held", str(tmp / "held"), "subdirs")]
  out = tmp / "data"
  build.build(srcs, str(out), build.Config(size=32, crop="none", detector="none"), workers=1,
              progress=False)
  return str(out)


def _info(data):
  manifest = records.load_manifest(data)
  return manifest, {r.id: r for r in split.read_records(data)}


def _per_class(ids, recs):
  return collections.Counter(recs[i].label for i in ids)


def _pool(result, recs):
  """Labeled training records per class (train_labeled + labeled ones in train_unlabeled)."""
  lists = result["lists"]
  return _per_class(lists["train_labeled"] + [i for i in lists["train_unlabeled"]
                                              if recs[i].label != records.UNLABELED], recs)


def _check_partition(result, recs):
  lists = result["lists"]
  assert set(lists) == set(records.SPLIT_NAMES)
  all_ids = [i for ln in records.SPLIT_NAMES for i in lists[ln]]
  assert len(all_ids) == len(set(all_ids)) == len(recs)  # disjoint, and complete:
  assert set(all_ids) == set(recs)
  for i in lists["train_labeled"] + lists["val"] + lists["test"]:
    assert recs[i].label != records.UNLABELED
  for ln, ids in lists.items():
    assert sum(result["counts"][ln].values()) == len(ids)


def test_fraction_split_is_stratified_disjoint_complete(data):
  manifest, recs = _info(data)
  r = split.split(data, "p10", split.Options(labeled_fraction=0.1))
  _check_partition(r, recs)
  assert r["manifest_sha256"] == manifest["manifest_sha256"]
  lists = r["lists"]
  labeled = [i for i, rec in recs.items() if rec.label != records.UNLABELED]
  n = collections.Counter(recs[i].label for i in labeled)
  for ln in ("val", "test"):
    want = {c: round(0.1 * k) for c, k in n.items()}
    assert _per_class(lists[ln], recs) == {c: k for c, k in want.items() if k}
  want = {c: max(1, round(0.1 * k)) for c, k in _pool(r, recs).items()}
  assert _per_class(lists["train_labeled"], recs) == want
  unlabeled = {i for i, rec in recs.items() if rec.label == records.UNLABELED}
  assert unlabeled and unlabeled <= set(lists["train_unlabeled"])
  assert r["counts"]["train_unlabeled"]["unlabeled"] == len(unlabeled)
  read_back = records.load_split(data, "p10", ["train_labeled"])
  ids = records.load_ids(data)
  assert sorted(ids[k] for k in read_back) == sorted(lists["train_labeled"])


def test_seeded_reproducible_and_one_labeled_set_for_every_stage(data):
  opts = split.Options(labeled_fraction=0.25, seed=3)
  a = split.split(data, "s3a", opts)
  b = split.split(data, "s3b", opts)
  assert a["lists"] == b["lists"]
  before = open(f"{data}/splits/s3a.json", "rb").read()
  split.split(data, "s3a", opts, overwrite=True)
  assert open(f"{data}/splits/s3a.json", "rb").read() == before
  c = split.split(data, "s4", split.Options(labeled_fraction=0.25, seed=4))
  assert set(c["lists"]["train_labeled"]) != set(a["lists"]["train_labeled"])
  assert json.loads(before)["options"]["seed"] == 3
  # the supervised and semi-supervised stages both read this one list
  assert (records.load_split(data, "s3a", ["train_labeled"]).tolist()
          == records.load_split(data, "s3a", ["train_labeled"]).tolist())


def test_labels_per_class_and_total_are_exact(data):
  _, recs = _info(data)
  r = split.split(data, "l5", split.Options(labels_per_class=5))
  _check_partition(r, recs)
  got = _per_class(r["lists"]["train_labeled"], recs)
  assert got == {c: min(5, k) for c, k in _pool(r, recs).items()}
  assert sorted(got.values())[1:] == [5] * 7  # contempt has 6: 1 val, 1 test, 4 left
  r = split.split(data, "t50", split.Options(labels_total=50))
  _check_partition(r, recs)
  got = _per_class(r["lists"]["train_labeled"], recs)
  assert sum(got.values()) == 50 and min(got.values()) >= 1 and len(got) == 8


def test_group_by_keeps_each_identity_in_one_list(data):
  _, recs = _info(data)
  r = split.split(data, "g", split.Options(labeled_fraction=0.1, group_by=IDENTITY, seed=1))
  _check_partition(r, recs)
  regex = re.compile(IDENTITY)
  owner = {}
  for ln, ids in r["lists"].items():
    for i in ids:
      m = regex.search(i.rsplit("/", 1)[-1])
      key = m.group(1) if m else i
      assert owner.setdefault(key, ln) == ln, f"identity {key} in {owner[key]} and {ln}"
  assert set(owner.values()) == set(records.SPLIT_NAMES)
  web = {m.group(1) for i in r["lists"]["train_unlabeled"] if i.startswith("web/")
         for m in [regex.search(i.rsplit("/", 1)[-1])]}
  assert web and all(owner[k] == "train_unlabeled" for k in web)  # seen unlabeled: stays there
  got = _per_class(r["lists"]["train_labeled"], recs)
  assert len(got) == 8  # every class labeled, even rare ones inside big identities


def test_test_source_becomes_the_test_list(data):
  _, recs = _info(data)
  opts = split.Options(labels_per_class=3, test_source="held", val_fraction=0.2)
  r = split.split(data, "ts", opts)
  _check_partition(r, recs)
  held = {i for i, rec in recs.items() if rec.source == "held"}
  assert set(r["lists"]["test"]) == held
  assert r["options"]["test_source"] == "held"


def test_refuses_to_overwrite_and_rejects_bad_options(data):
  split.split(data, "once", split.Options(labels_total=20))
  with pytest.raises(FileExistsError, match="--overwrite"):
    split.split(data, "once", split.Options(labels_total=20))
  with pytest.raises(ValueError, match="exactly one"):
    split.split(data, "x", split.Options(labeled_fraction=0.1, labels_total=10))
  with pytest.raises(ValueError, match="capture group"):
    split.split(data, "x", split.Options(labeled_fraction=0.1, group_by=r"\d+"))
  with pytest.raises(ValueError, match="test-source 'nope'"):
    split.split(data, "x", split.Options(labeled_fraction=0.1, test_source="nope"))


def test_cli_prints_the_count_table(data):
  run = subprocess.run([sys.executable, "-m", "data_prep", "split", "--data", data, "--name", "cli",
                        "--labels-per-class", "4", "--group-by", IDENTITY, "--seed", "7"],
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert lines[1].split()[:3] == ["list", "anger", "contempt"]
  rows = [ln.split()[0] for ln in lines[2:] if ln.split() and ln.split()[0] != "target"]
  assert rows[:4] == list(records.SPLIT_NAMES)
  saved = json.load(open(f"{data}/splits/cli.json"))
  # A grouped draw may miss a class's target: the table then prints it under the list.
  for ln in records.SPLIT_NAMES:
    target = saved["targets"].get(ln)
    missed = target and any(saved["counts"][ln][c] != n for c, n in target.items())
    at = next(i for i, line in enumerate(lines) if line.startswith(ln))
    assert lines[at + 1].startswith("  target") == bool(missed)
  assert saved["options"]["group_by"] == IDENTITY and saved["options"]["seed"] == 7


def _identity(rid):
  m = re.search(IDENTITY, rid.rsplit("/", 1)[-1])
  return m.group(1) if m else rid


def _labeled(recs):
  return {i for i, rec in recs.items() if rec.label != records.UNLABELED}


def test_folds_partition_the_labeled_records_stratified(data):
  manifest, recs = _info(data)
  rs = split.kfold(data, "cv5", split.FoldOptions(folds=5, seed=2))
  assert [r["name"] for r in rs] == [f"cv5_fold{k}" for k in range(5)]
  assert split.fold_names(data, "cv5") == [r["name"] for r in rs]
  tested = [i for r in rs for i in r["lists"]["test"]]
  assert len(tested) == len(set(tested)) and set(tested) == _labeled(recs)  # each once
  unlabeled = set(recs) - _labeled(recs)
  for k, r in enumerate(rs):
    _check_partition(r, recs)
    assert r["manifest_sha256"] == manifest["manifest_sha256"] and r["options"]["fold"] == k
    assert set(r["lists"]["train_unlabeled"]) == unlabeled
    pool = _per_class(r["lists"]["val"] + r["lists"]["train_labeled"], recs)
    assert _per_class(r["lists"]["val"], recs) == {c: round(0.1 * n) for c, n in pool.items()
                                                   if round(0.1 * n)}
    ids = records.load_ids(data)
    got = records.load_split(data, split.fold_name("cv5", k), ["test"])
    assert sorted(ids[i] for i in got) == sorted(r["lists"]["test"])
  per_fold = [_per_class(r["lists"]["test"], recs) for r in rs]
  for c in {rec.label for rec in recs.values()} - {records.UNLABELED}:
    counts = [f[c] for f in per_fold]
    assert max(counts) - min(counts) <= 1, (c, counts)


def test_grouped_folds_keep_identities_whole(data):
  _, recs = _info(data)
  with pytest.warns(split.FoldWarning, match="'disgust'.*identities stay whole"):
    rs = split.kfold(data, "cvg", split.FoldOptions(folds=5, group_by=IDENTITY, seed=1))
  test_fold = {}
  for k, r in enumerate(rs):
    _check_partition(r, recs)
    owner = {}
    for ln, ids in r["lists"].items():
      for i in ids:
        key = _identity(i)
        assert owner.setdefault(key, ln) == ln, f"fold {k}: {key} in {owner[key]} and {ln}"
        if ln == "test":
          assert test_fold.setdefault(key, k) == k, f"{key} tested in folds {test_fold[key]}, {k}"
    assert r["lists"]["val"] and r["lists"]["train_labeled"]
  # identities seen unlabeled stay in train_unlabeled (as in `split`); the rest is tested once
  seen = {_identity(i) for i in recs if recs[i].label == records.UNLABELED}
  assert seen
  tested = [i for r in rs for i in r["lists"]["test"]]
  assert len(tested) == len(set(tested))
  assert set(tested) == {i for i in _labeled(recs) if _identity(i) not in seen}


def test_folds_are_seeded_reproducible_and_one_set(data):
  opts = split.FoldOptions(folds=3, seed=5)
  a = split.kfold(data, "cva", opts)
  b = split.kfold(data, "cvb", opts)
  assert [r["lists"] for r in a] == [r["lists"] for r in b]
  before = [open(f"{data}/splits/cva_fold{k}.json", "rb").read() for k in range(3)]
  with pytest.raises(FileExistsError, match="cva_fold0.json exists.*--overwrite"):
    split.kfold(data, "cva", opts)
  split.kfold(data, "cva", opts, overwrite=True)
  assert [open(f"{data}/splits/cva_fold{k}.json", "rb").read() for k in range(3)] == before
  c = split.kfold(data, "cvc", split.FoldOptions(folds=3, seed=6))
  assert c[0]["lists"]["test"] != a[0]["lists"]["test"]
  split.kfold(data, "cva", split.FoldOptions(folds=2, seed=5), overwrite=True)
  assert split.fold_names(data, "cva") == ["cva_fold0", "cva_fold1"]
  assert not (pathlib.Path(data) / "splits" / "cva_fold2.json").exists()  # no stale fold
  with pytest.raises(errors.DatasetError, match="nope_fold0.json not found.*--folds K"):
    split.fold_names(data, "nope")


def test_folds_reject_bad_options_and_warn_on_thin_classes(data):
  with pytest.raises(ValueError, match="--folds 1: want >= 2"):
    split.kfold(data, "x", split.FoldOptions(folds=1))
  with pytest.raises(ValueError, match="--val-fraction 1.0"):
    split.kfold(data, "x", split.FoldOptions(folds=3, val_fraction=1.0))
  with pytest.raises(ValueError, match="capture group"):
    split.kfold(data, "x", split.FoldOptions(folds=3, group_by=r"\d+"))
  with pytest.raises(ValueError, match="--folds 99: only .* labeled identities"):
    split.kfold(data, "x", split.FoldOptions(folds=99, group_by=r"^(\w)"))
  with pytest.warns(split.FoldWarning, match=r"'contempt' \(6 labeled records\) is in no test"):
    rs = split.kfold(data, "cv7", split.FoldOptions(folds=7))  # contempt has 6 < 7
  assert sum(1 for r in rs if r["counts"]["test"]["contempt"]) == 6


@pytest.mark.parametrize("extra, message", [
    (["--labeled-fraction", "0.1"], "not allowed with"),
    (["--labels-total", "20"], "not allowed with"),
    (["--test-fraction", "0.2"], "--folds excludes --test-fraction"),
    (["--test-source", "held"], "--folds excludes --test-source"),
    (["--folds", "1"], "--folds 1: want >= 2"),
])
def test_folds_cli_rejects_conflicting_options(data, capsys, extra, message):
  argv = ["split", "--data", data, "--name", "bad", "--folds", "3", *extra]
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse's own mutually-exclusive check
    rc = e.code
  assert rc == 2 and message in capsys.readouterr().err
  assert not list((pathlib.Path(data) / "splits").glob("bad_fold*.json"))


def test_folds_cli_writes_the_set_and_prints_warnings(data, capsys):
  assert cli.main(["split", "--data", data, "--name", "cvcli", "--folds", "7", "--seed", "1"]) == 0
  out, err = capsys.readouterr()
  assert f"wrote {data}/splits/cvcli_fold0.json ... cvcli_fold6.json" in out
  assert out.count("list ") == 7 and "cvcli_fold6:" in out
  assert "warning: class 'contempt'" in err
  assert split.fold_names(data, "cvcli") == [f"cvcli_fold{k}" for k in range(7)]
  assert json.load(open(f"{data}/splits/cvcli_fold3.json"))["options"] == {
      "folds": 7, "fold": 3, "val_fraction": 0.1, "group_by": None, "group_min_match": 0.9,
      "seed": 1}


@hypothesis.given(st.lists(st.integers(1, 500), min_size=1, max_size=9), st.data())
@hypothesis.settings(max_examples=200, deadline=None)
def test_proportional_allocation_sums_exactly(counts, draw):
  counts = dict(enumerate(counts))
  total = draw.draw(st.integers(len(counts), sum(counts.values())))
  alloc = split.proportional(counts, total)
  assert sum(alloc.values()) == total
  assert all(1 <= alloc[c] <= counts[c] for c in counts)


def test_group_by_matching_too_few_ids_is_refused_and_empty_classes_warn(data, capsys):
  typo = r"^(.*)-\d+\.\w+$"   # "-" for "_": matches no demo file name
  with pytest.raises(ValueError, match=r"finds an identity in 0 of \d+ record ids"):
    split.split(data, "typo", split.Options(labeled_fraction=0.1, group_by=typo))
  with pytest.raises(ValueError, match="group-min-match"):
    split.kfold(data, "typo", split.FoldOptions(folds=3, group_by=typo))
  assert not (pathlib.Path(data) / "splits" / "typo.json").exists()
  # The CLI reports how many matched, and warns for classes val or test lack.
  assert cli.main(["split", "--data", data, "--name", "gm", "--labeled-fraction", "0.1",
                   "--group-by", IDENTITY, "--val-fraction", "0.01", "--seed", "2"]) == 0
  out = capsys.readouterr()
  n = json.loads((pathlib.Path(data) / "splits" / "gm.json").read_text())["group_by_matched"]
  assert f"found an identity in {n['ids']} of {n['of']} record ids" in out.out
  assert n["ids"] >= 0.9 * n["of"]
  assert re.search(r"warning: gm: class '\w+' has no val records", out.err)
