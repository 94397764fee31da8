"""Every stage by the id its config names (`config.stage`): the command line and the job look
a stage's factory up here, so neither needs to know the trainers one by one."""

from __future__ import annotations

from ssfer_jax.trainers import finetune, loop, pretrain, semisup

STAGES: dict[str, loop.StageFactory] = {
    pretrain.STAGE: pretrain.make_stage,
    finetune.STAGE: finetune.make_stage,
    semisup.STAGE: semisup.make_stage,
}
