"""Analyses of data and trained classifiers, each a command (`python -m
ssfer_jax.analysis.NAME`): the classical floor on pixels and HOG (`classical`), k-fold
cross-validation (`kfold`), the label-noise study (`label_noise`), Grad-CAM maps
(`gradcam`) and FGSM robustness (`fgsm`)."""
