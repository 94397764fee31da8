"""Performance scripts, each run from the repository root as `python -m benchmarks.NAME`;
they print comparable tables (ratios measured side by side) and their figures are in
RESULTS.md. The science grids are in experiments/."""
