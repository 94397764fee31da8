"""From stored records to device batches: the record schema and dataset layout shared with
data_prep (`records`), the host-side crop and flip (`augment`), the grain pipelines per batch
kind (`pipeline`), several builds in one stream (`blend`), what the loop plans a stage's data
with (`plan`), the on-device resample and normalisation (`device`), the strong view on the
device (`randaugment`) and the check that training never saw an evaluation image
(`leakage`)."""
