"""What any stage or command runs on, knowing nothing of SSFER: the device mesh and its
shardings (`sharding`), joining the other processes (`distributed`), orbax checkpoints
(`checkpointing`), the workdir's lock and resume rules (`workdir`), preemption signals
(`preemption`), metric writers (`writers`), log routing (`logs`) and matplotlib figures
(`figures`). Nothing here imports a trainer, a model or a method."""
