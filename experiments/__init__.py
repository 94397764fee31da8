"""The science grids and diagnoses (`python -m experiments.NAME` from the repository root):
stage ablations, the FaceMix kappa study and the factor-by-factor diagnosis of stage 2.
Their figures are in benchmarks/RESULTS.md beside the performance ones."""
