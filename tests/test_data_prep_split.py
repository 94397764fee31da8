"""`data_prep split` over a real build: disjoint, complete, stratified, grouped, seeded."""

import collections
import json
import re
import subprocess
import sys

import hypothesis
import pytest
from hypothesis import strategies as st

from data_prep import build, sources, split
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
  srcs = [sources.CsvSource("demo", str(demo_data_dir / "labels.csv"),
                            root=str(demo_data_dir / "images")),
          sources.FolderSource("web", str(unl), "none"),
          sources.FolderSource("held", str(tmp / "held"), "subdirs")]
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
  assert [ln.split()[0] for ln in lines[2:6]] == list(records.SPLIT_NAMES)
  saved = json.load(open(f"{data}/splits/cli.json"))
  assert saved["options"]["group_by"] == IDENTITY and saved["options"]["seed"] == 7


@hypothesis.given(st.lists(st.integers(1, 500), min_size=1, max_size=9), st.data())
@hypothesis.settings(max_examples=200, deadline=None)
def test_proportional_allocation_sums_exactly(counts, draw):
  counts = dict(enumerate(counts))
  total = draw.draw(st.integers(len(counts), sum(counts.values())))
  alloc = split.proportional(counts, total)
  assert sum(alloc.values()) == total
  assert all(1 <= alloc[c] <= counts[c] for c in counts)
