"""`python -m data_prep verify DATA_DIR`: every shard and ids.txt against the manifest's
checksums and counts. Reads every byte (about as long as copying the dataset), which is why
training start-up does not do it; run it after copying a dataset, or when a read fails.
"""

from __future__ import annotations

import hashlib
import os

from array_record.python.array_record_module import ArrayRecordReader

from data_prep import items
from ssfer_jax.input import records


def verify(data_dir: str) -> list[str]:
  """What does not match the manifest, one line each (empty: the dataset is intact)."""
  manifest = records.load_manifest(data_dir)
  problems = []
  for shard in manifest["shards"]:
    path = os.path.join(data_dir, shard["file"])
    if not os.path.isfile(path):
      problems.append(f"{path}: missing")
      continue
    digest = items.sha256_file(path)
    if digest != shard["sha256"]:
      problems.append(f"{path}: sha256 {digest}, the manifest says {shard['sha256']} (damaged "
                      "or replaced)")
      continue
    reader = ArrayRecordReader(path)
    count = reader.num_records()
    reader.close()
    if count != shard["num_records"]:
      problems.append(f"{path}: {count} records, the manifest says {shard['num_records']}")
  ids = os.path.join(data_dir, records.IDS_FILE)
  with open(ids, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != manifest.get("ids_sha256"):
    problems.append(f"{ids}: sha256 {digest}, the manifest says {manifest.get('ids_sha256')}")
  return problems
