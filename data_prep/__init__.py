"""Raw images to ArrayRecord shards (`python -m data_prep build|split|verify`): the readers of
each input format (`readers/`) and the items they list (`items`), face detection and framing
(`faces`, `images`), the parallel build (`build`), splits and folds (`split`), the integrity
check (`verify`) and the label vocabulary (`vocabulary`)."""
