"""Shared test fixtures and helper scripts: the synthetic record writer (`dataset_fixture`),
the paper datasets' on-disk formats (`paper_datasets`), and the scripts the multi-process and
timm tests run in their own interpreters (`multiprocess_worker`, `timm_check`). The
benchmarks import them too (run as `python -m benchmarks.NAME` from the repository root)."""
