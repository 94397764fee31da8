"""SSFER in JAX: MAE pretraining, FaceMix fine-tuning and semi-supervised fine-tuning of a ViT
for facial expression recognition.

Commands and contracts at this level: `main` (the command line: one stage, or the whole
job), `job` and `job_report` (the one-command job and its report), `results` (what a
finished run leaves and how it is read back), `errors` (the user-error family), `evaluate`,
`predict`, `export` and `pytorch_weights` (timm / MAE weight files in and out). The folders:
`input/` (records to device batches), `models/`, `methods/` (the paper's methods, pure JAX),
`trainers/` (the loop and the stages), `runtime/` (mesh, checkpoints, workdir, logs) and
`analysis/` (the floor, k-fold, label noise, Grad-CAM, FGSM). Imports point down that list:
nothing in runtime/, methods/ or models/ imports a trainer, a command or an analysis.
"""
