"""Training: the one loop every stage runs (`loop`), the optimiser and schedules (`optim`),
the three stages (`pretrain`: MAE; `finetune`: supervised with FaceMix; `semisup`: EMA teacher
and pseudo-labels), what stages 2 and 3 share (`classifier`) and the stage registry
(`stages`). Only commands that train (main, job, kfold) import this package."""
