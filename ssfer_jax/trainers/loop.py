"""The one training loop every stage runs.

A stage contributes a `Stage`: how to build its (boxed) train state, a pure loss function,
the batch kind it eats, its FLOPs per example, optional stage state kept beside the params
(`TrainState.extra`: EMA weights, threshold statistics), an optional warm start, an
optional evaluator and hooks (figures, per-epoch state updates). The loop owns everything
else, in big_vision's order: mesh and input; shapes via `jax.eval_shape`; a jitted init
straight into the inferred shardings (or a restore into them); the step compiled ahead of
time with donated state; then the loop with logging, evaluation, hooks, checkpoints (the
latest N plus the best on val), a guard against non-finite values, and the stage's result
file (`result.json`) at the end.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from ssfer_jax import errors, results
from ssfer_jax.input import pipeline, plan as plan_lib
from ssfer_jax.runtime import checkpointing, preemption, sharding, writers
from ssfer_jax.runtime import workdir as workdir_lib
from ssfer_jax.trainers import optim

# (params, extra, batch, rng) -> (loss, aux). aux's scalars are logged as metrics, its
# arrays as histograms; aux["extra"], if present, is the input of `Stage.update_extra`
# and is neither logged nor returned.
LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any = None   # the stage's own state (a pytree; boxed like params where sharded)


@dataclasses.dataclass(frozen=True)
class StateUpdate:
  """What a hook returns to change the train state between steps (e.g. once per epoch)."""
  state: TrainState
  metrics: Mapping[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Hook:
  """Host-side work every `every` steps (and after the last step): figures, state updates.

  `fn` returns metrics to log (under `prefix`), None, or a `StateUpdate`.
  """
  every: int
  fn: Callable[[TrainState, int], Mapping[str, float] | StateUpdate | None]
  prefix: str = "eval"


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of the train state on held-out data.

  `select` ranks checkpoints (higher is better); `report` (JSON) is what the stage's
  result records for the best one, e.g. which weights (raw or EMA) won and their metrics.
  """
  metrics: Mapping[str, float]
  select: float
  report: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  batch_kind: str                      # a kind of `ssfer_jax.input.pipeline`
  init: Callable[[jax.Array], TrainState]  # returns boxed (logically annotated) params
  loss_fn: LossFn
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_flops_per_example: float
  hooks: Sequence[Hook] = ()
  # (extra, new params, aux["extra"], step) -> new extra, inside the jitted step.
  update_extra: Callable[[Any, Any, Any, jax.Array], Any] | None = None
  # A fresh state -> the state training starts from (pretrained weights); never on resume.
  warm_start: Callable[[TrainState], TrainState] | None = None
  evaluate: Callable[[TrainState, int], Evaluation] | None = None
  eval_every: int = 0
  # What `result.json` records beside the best checkpoint: class names, preprocessing.
  result_info: Mapping[str, Any] | None = None


StageFactory = Callable[[ml_collections.ConfigDict, "RunPlan", str], Stage]


class NonFiniteError(errors.UserError, RuntimeError):
  pass


class DiskFullError(errors.UserError, OSError):
  """The disk (or quota) filled while the run wrote to its workdir."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What the loop derived from the config and the data, before anything compiles."""
  mesh: jax.sharding.Mesh
  data: plan_lib.TrainData
  total_steps: int

  @property
  def steps_per_epoch(self) -> int:
    return self.data.steps_per_epoch


def metrics_collection(names: Sequence[str]) -> type[clu_metrics.Collection]:
  return clu_metrics.Collection.create(
      **{n: (clu_metrics.LastValue if n == "lr" else clu_metrics.Average).from_output(n)
         for n in names})


def all_finite(tree: Any) -> jax.Array:
  """True when every inexact leaf of `tree` is finite (integer leaves always are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# `all_finite` outside a jitted step (on the host, between steps): one compiled program. Eagerly
# it dispatches two programs per leaf, and a reduction over a sharded leaf is a cross-device
# all-reduce; dozens of those in flight at once can deadlock XLA:CPU's multi-device client (each
# device admits 32 computations in flight, launches then block its worker threads, and an
# all-reduce whose peers cannot launch is aborted after 40 s: "Termination timeout ... Exiting to
# ensure a consistent program state", SIGABRT). Under jit it is one launch per device.
_all_finite_jit = jax.jit(all_finite)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int,
                    update_extra: Callable | None = None) -> Callable:
  """The pure update shared by all stages.

  Per-step randomness is `fold_in(seed, step)`, so a resumed run draws the same masks and
  augmentations. A non-finite loss, gradient or stage state leaves params, optimiser state
  and stage state untouched and lowers the `finite` flag the loop stops on.
  """

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.extra, batch, rng)
    aux = dict(aux)
    extra_input = aux.pop("extra", None)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extra = state.extra
    if update_extra is not None:
      extra = update_extra(state.extra, params, extra_input, state.step)
    # The new params too: a finite gradient times a NaN or infinite learning rate is not.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
              & all_finite(extra))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              extra=keep(extra, state.extra))
    outputs = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), **aux)
    return new_state, outputs, finite

  return step


def plan_run(config: ml_collections.ConfigDict, mesh_devices=None) -> RunPlan:
  """Validates the config against devices and data; every error here precedes compilation."""
  if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
    raise errors.ConfigError(f"batch_size={config.batch_size!r}; use a whole number >= 1 "
                             "(the global batch, across all devices).")
  check_finite_numbers(config)
  optim.check_config(config.optim)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, mesh_devices)
  sharding.check_batch_size(config.batch_size, mesh)
  data = plan_lib.train_data(config, mesh)
  total = config.total_steps if config.total_steps > 0 else data.epochs * data.steps_per_epoch
  if total <= 0:
    raise errors.ConfigError("set total_steps > 0 or num_epochs > 0.")
  return RunPlan(mesh, data, int(total))


def check_finite_numbers(config: ml_collections.ConfigDict) -> None:
  """ConfigError for a NaN or infinite number anywhere in the config: no field means anything
  by one, and a NaN learning rate would turn every weight into NaN at the first step."""
  bad = [f"{k}={v}" for k, v in workdir_lib.flatten(config.to_dict()).items()
         if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    raise errors.ConfigError(f"{', '.join(bad)}: use finite numbers.")


def compile_train_step(stage: Stage, seed: int, abstract_state: Any, state_shardings: Any,
                       batch_spec: Any, mesh) -> Any:
  """The stage's train step compiled ahead of time for these shapes and shardings, the state
  donated (the loop's step; the benchmarks compile the same one)."""
  batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch_spec)
  step_fn = make_train_step(stage.loss_fn, stage.tx, stage.schedule, seed, stage.update_extra)
  return jax.jit(
      step_fn, in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh), sharding.replicated(mesh)),
      donate_argnums=0).lower(abstract_state, batch_spec).compile()


def _peak_flops(config: ml_collections.ConfigDict, mesh) -> float | None:
  """Peak FLOP/s of the whole mesh, from `config.peak_tflops_per_device` (0 = unknown)."""
  peak = config.get("peak_tflops_per_device", 0.0)
  return peak * 1e12 * mesh.devices.size if peak > 0 else None


def state_layout(config: ml_collections.ConfigDict, stage: Stage, mesh) -> tuple[Any, Any]:
  """The unboxed abstract state (carrying NamedShardings) and its shardings, from shapes only."""
  abstract_boxed = jax.eval_shape(stage.init, jax.random.key(config.seed))
  shardings = sharding.logical_shardings(abstract_boxed, mesh, config.sharding_rules)
  abstract = checkpointing.abstract_with_shardings(nn.meta.unbox(abstract_boxed), shardings)
  return abstract, shardings


def train(config: ml_collections.ConfigDict, workdir: str, make_stage: StageFactory,
          *, stop_at: int | None = None, allow_schedule_change: bool = False) -> TrainState:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint if any.

  `stop_at` ends the run early at that step (with a checkpoint), as a preemption would.
  A finished run leaves `result.json` (written atomically): a stage with an evaluator names
  its best checkpoint on val, stage 1 its last; the one-command job reads it as "done".
  One job at a time holds the workdir (`workdir.Lock`); a resume under another config is
  refused with the fields that changed (`workdir.check_resume`), and a damaged latest
  checkpoint gives way to the previous one. On SIGTERM/SIGINT (or JAX's preemption sync
  point) the run saves the step every process agreed on and raises `preemption.Preempted`.
  """
  workdir_lib.prepare(workdir)
  try:
    with workdir_lib.Lock(workdir):
      return _train(config, workdir, make_stage, stop_at, allow_schedule_change)
  except OSError as e:
    if e.errno not in DISK_FULL:
      raise
    raise DiskFullError(
        f"{os.strerror(e.errno)} writing {e.filename or 'to ' + workdir}: the run stopped. Last "
        f"good checkpoint: {checkpointing.last_committed(checkpointing.directory(workdir))}. "
        "Free space, then rerun the same command to resume from it.") from None


def _train(config, workdir, make_stage, stop_at, allow_schedule_change) -> TrainState:
  plan = plan_run(config)
  mesh = plan.mesh
  logging.info("%s; %s, %d steps/epoch, %d steps", sharding.describe(mesh),
               plan.data.describe(), plan.steps_per_epoch, plan.total_steps)
  stage = make_stage(config, plan, workdir)
  config_json = json.loads(config.to_json_best_effort())

  train_iter = plan.data.iterator(stage.batch_kind, config.seed)

  # State: shapes first, then a jitted init into the shardings, or a restore into them.
  abstract_state, state_shardings = state_layout(config, stage, mesh)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                    keep_best=stage.evaluate is not None)
  data_identity = plan.data.identity()

  def check_resume(saved_config: dict, saved_meta: dict, where: str) -> None:
    workdir_lib.check_resume(saved_config, config_json, where,
                             allow_schedule_change=allow_schedule_change)
    workdir_lib.check_data(saved_meta.get("data"), data_identity, where)

  restored = ckpt.restore_latest(abstract_state, train_iter, stage.name, check_resume)
  if restored is not None:
    start, state = restored
  else:
    init = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=state_shardings)
    state = init(jax.random.key(config.seed))
    if stage.warm_start is not None:
      state = stage.warm_start(state)
    if not bool(_all_finite_jit(state)):
      source = f" warm-started from {config.init_from}" if config.get("init_from") else ""
      raise NonFiniteError(f"stage {stage.name}: the initial state{source} holds NaN or "
                           "infinite values; check the weights it starts from.")
    start = 0
  if jax.process_index() == 0:   # the config this run trains with, once it may
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_json, f, indent=2)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
  logging.info("stage %s: %.2fM parameters, starting at step %d", stage.name, n_params / 1e6, start)

  # The step, compiled ahead of time against the batch spec (no batch needs to be pulled).
  batch_spec = plan.data.batch_spec(stage.batch_kind)
  t0 = time.perf_counter()
  compiled = compile_train_step(stage, config.seed, abstract_state, state_shardings,
                                batch_spec, mesh)
  logging.info("step compiled in %.1fs; %s", time.perf_counter() - t0,
               _memory_summary(compiled))

  writer = writers.MetricWriter(workdir, tensorboard=config.get("tensorboard", True),
                                resume_step=start)
  flops_per_step = stage.train_flops_per_example * config.batch_size
  peak = _peak_flops(config, mesh)
  end = min(plan.total_steps, stop_at) if stop_at else plan.total_steps
  metrics_cls, collection = None, None
  best_select = _best_select(ckpt)
  pending = None       # (step, finite flag) of the previous step, checked one step late
  last_log_t, data_wait, steps_since_log = time.perf_counter(), 0.0, 0

  def finish_checks(pending) -> None:
    step_done, finite = pending
    if bool(finite):
      return
    # The guarded step left the state finite: keep it, so a loadable checkpoint always exists.
    ckpt.wait()
    if ckpt.latest_step() is None:
      ckpt.save(int(state.step), state, train_iter, config_json, stage.name, data=data_identity)
      ckpt.wait()
    raise NonFiniteError(
        f"non-finite loss, gradient or stage state at step {step_done}; its update was "
        f"skipped and the run stopped. Last good checkpoint: step {ckpt.latest_step()} in "
        f"{ckpt.directory}")

  watch = preemption.Watch().start()
  try:
    for step in range(start + 1, end + 1):
      t = time.perf_counter()
      batch = pipeline.to_global(next(train_iter), mesh)
      data_wait += time.perf_counter() - t
      state, outputs, finite = compiled(state, batch)
      if pending is not None:
        finish_checks(pending)
      pending = (step, finite)
      scalars = {k: v for k, v in outputs.items() if v.ndim == 0}
      metrics_cls = metrics_cls or metrics_collection(sorted(scalars))
      single = metrics_cls.single_from_model_output(**scalars)
      collection = single if collection is None else collection.merge(single)
      steps_since_log += 1

      if step % config.log_every == 0 or step == end:
        finish_checks(pending)
        scalars = {k: float(v) for k, v in collection.compute().items()}
        dt = (time.perf_counter() - last_log_t) / steps_since_log
        scalars.update(step_time_s=dt, data_wait_s=data_wait / steps_since_log,
                       compute_s=dt - data_wait / steps_since_log,
                       images_per_s=plan.data.images_per_step / dt,
                       epoch=step / plan.steps_per_epoch)
        if peak:
          scalars["mfu"] = flops_per_step / dt / peak
        writer.write_scalars(step, scalars)
        writer.write_histograms(step, {k: v for k, v in outputs.items() if v.ndim > 0})
        logging.info("step %d/%d (%.0f%%), ETA %s", step, plan.total_steps,
                     100 * step / plan.total_steps, duration((plan.total_steps - step) * dt))
        collection, data_wait, steps_since_log = None, 0.0, 0
        last_log_t = time.perf_counter()
      for hook in stage.hooks:
        if step % hook.every == 0 or step == end:
          state = _run_hook(hook, state, step, writer)
      evaluation = None
      if stage.evaluate is not None and (step == end or (stage.eval_every and
                                                        step % stage.eval_every == 0)):
        t = time.perf_counter()
        evaluation = stage.evaluate(state, step)
        writer.write_scalars(step, evaluation.metrics, prefix="val")
        last_log_t += time.perf_counter() - t   # evaluation time is not step time
      # An evaluation is saved (as a candidate for "best") only when it beats the best so
      # far: evaluating every epoch must not mean writing a checkpoint every epoch.
      new_best = evaluation is not None and evaluation.select > best_select
      preempted = step < end and watch.reached(step)
      if new_best or step % config.checkpoint_every == 0 or step == end or preempted:
        if preempted:
          finish_checks(pending)   # never save a step the guard would reject
        ckpt.save(step, state, train_iter, config_json, stage.name, data=data_identity,
                  metrics=None if evaluation is None else
                  {"select": evaluation.select, "report": dict(evaluation.report)})
        if new_best:
          best_select = evaluation.select
      if preempted:
        ckpt.wait()
        raise preemption.Preempted(step, watch.signum, ckpt.directory)
    if pending is not None:
      finish_checks(pending)
    ckpt.wait()   # the last save committed (or retried), before anything reads it
    if end == plan.total_steps:
      write_result(workdir, stage, ckpt, config_json)
  finally:
    watch.stop()
    writer.close()
    ckpt.close()
  return state


def _best_select(ckpt: checkpointing.Checkpointer) -> float:
  """The best `select` saved so far (a resumed run keeps competing against it)."""
  step = ckpt.best_step()
  metrics = ckpt.metrics(step) if step is not None else None
  return metrics["select"] if metrics else -math.inf


def _run_hook(hook: Hook, state: TrainState, step: int, writer: writers.MetricWriter):
  out = hook.fn(state, step)
  if isinstance(out, StateUpdate):
    if not bool(_all_finite_jit(out.state.extra)):
      raise NonFiniteError(f"a hook left non-finite stage state at step {step}; the run "
                           "stopped before saving it.")
    state, out = out.state, out.metrics
  if out:
    writer.write_scalars(step, out, prefix=hook.prefix)
  return state


def write_result(workdir: str, stage: Stage, ckpt: checkpointing.Checkpointer,
                 config_json: dict) -> dict:
  """`result.json`: the best checkpoint on val (the last one for a stage that does not
  evaluate) and all a later stage needs to use it."""
  step = ckpt.best_step()
  best = ckpt.metrics(step) or {}
  result = {"stage": stage.name, "step": step, "checkpoint_dir": ckpt.directory,
            **best.get("report", {}), **(stage.result_info or {}), "config": config_json}
  if jax.process_index() == 0:
    path = writers.write_json(os.path.join(workdir, results.RESULT_FILE), result)
    weights = best.get("report", {}).get("weights")
    logging.info("result: step %d%s -> %s", step, f" ({weights} weights)" if weights else "",
                 path)
  return result


def run_hooks(config: ml_collections.ConfigDict, workdir: str, make_stage: StageFactory) -> int:
  """Runs every hook of the stage once on the latest checkpoint (figures on demand)."""
  with workdir_lib.Lock(workdir):
    return _run_hooks(config, workdir, make_stage)


def _run_hooks(config, workdir, make_stage) -> int:
  plan = plan_run(config)
  stage = make_stage(config, plan, workdir)
  abstract_state, _ = state_layout(config, stage, plan.mesh)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {ckpt.directory}: train first.")
  state = ckpt.restore(step, abstract_state, None, stage.name)
  ckpt.close()
  writer = writers.MetricWriter(workdir, tensorboard=False)
  for hook in stage.hooks:
    _run_hook(hook, state, step, writer)
  writer.close()
  return step


def duration(seconds: float) -> str:
  h, rem = divmod(int(seconds), 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _memory_summary(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except   (not every backend reports it)
    return "memory analysis unavailable"
  if m is None:
    return "memory analysis unavailable"
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  return (f"per-device memory: arguments {gib(m.argument_size_in_bytes)}, outputs "
          f"{gib(m.output_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}, "
          f"aliased {gib(m.alias_size_in_bytes)}")
