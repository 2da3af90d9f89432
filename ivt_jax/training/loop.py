"""The training loop: `train_and_evaluate(config, workdir)`.

Prepares what is missing, trains with the sharded step, checkpoints (state + input iterator) every
`checkpoint_every_steps` and on SIGTERM, evaluates on val every `eval_every_epochs` and keeps the best
parameters by validation R@1 (never selecting on test), then evaluates those on test and writes
<workdir>/metrics.json, the metric writer's scalars and <workdir>/retrieval.png. Restarting the same command
resumes from the latest checkpoint.
"""
import concurrent.futures
import functools
import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from input_pipeline import paths
from input_pipeline import shapes
from ivt_jax.training import checkpoints
from ivt_jax.runtime import console
from ivt_jax.evaluation import evaluate as evaluate_lib
from ivt_jax.models import encoder as model_lib
from ivt_jax.training import optim
from ivt_jax.training import prefetch
from ivt_jax.training import run_guard
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import step as step_lib
from ivt_jax.training import setup as step_setup


class NonFiniteError(FloatingPointError):
  pass


class _Preemption:
  """Turns SIGTERM into a flag the loop polls (all processes agree on it)."""

  def __init__(self):
    self.flag = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.flag = True

  def reached(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return bool(multihost_utils.process_allgather(np.int32(self.flag)).max())

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _resolve_data_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """SynthPEDES is drawn into <workdir>/synthpedes, or for a gs:// workdir into the local cache (it is raw
  input, read from a local disk; the prepared data go to the bucket)."""
  from input_pipeline import prepare as prepare_lib
  config = ml_collections.ConfigDict(config.to_dict())
  if config.data.synthetic.enabled and not config.data.manual_dir:
    config.data.manual_dir = (os.path.join(prepare_lib.local_cache_of(config, workdir), 'synthpedes')
                              if paths.is_remote(workdir) else os.path.join(workdir, 'synthpedes'))
  return config


class _StepsByLength:
  """The training step compiled for each padded text length the pipeline gives (data.text_buckets; one without
  buckets). Every length is traced here and compiled by XLA in one background thread, shortest first, while this
  thread goes on (initializing or restoring the state); a step waits only for its own length's program.

  With data.text_packing a program is also per slot count (the batch's prefetch.TEXT_SLOTS): each is compiled
  the first time a batch needs it (at most packing.GRANULES per length; sums of many captions' lengths vary
  little, so a run meets a few)."""

  def __init__(self, make_step, abstract_state, config, global_batch: int, mesh):
    self._lengths = shapes.text_buckets(config, jax.process_count())
    self._levels = shapes.level_text_lengths(config)
    self._make_step, self._abstract_state = make_step, abstract_state
    self._config, self._global_batch, self._mesh = config, global_batch, mesh
    self._compiled = {}
    if config.data.get('text_packing', False):
      return
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile')
    for length in self._lengths:
      self._compiled[length, None] = pool.submit(self._lower(length, None).compile)
    pool.shutdown(wait=False)

  def _lower(self, length, slots):
    packed = None if slots is None else (self._mesh.size, slots)
    return self._make_step(shapes.bucket_text_lengths(self._levels, length), packed).lower(
        self._abstract_state, step_setup.abstract_batch(self._config, self._global_batch, self._mesh, length))

  def __call__(self, state, batch):
    slots = batch.pop(prefetch.TEXT_SLOTS, None)
    length = batch['text_ids'].shape[-1]
    if length not in self._lengths:
      raise ValueError(f'a training batch padded to {length} text positions: not one of data.text_buckets + '
                       f'data.text_length {sorted(self._lengths)}')
    if (length, slots) not in self._compiled:
      logging.info('compiling the training step for texts of %d positions packed in %d slots per device',
                   length, slots)
      done = concurrent.futures.Future()
      done.set_result(self._lower(length, slots).compile())
      self._compiled[length, slots] = done
    return self._compiled[length, slots].result()(state, batch)


def _init_params(config, module, shardings, rng):
  params = jax.jit(functools.partial(model_lib.init_module_params, module), out_shardings=shardings)(rng)
  if any(config.init.get(k) for k in ('vit_npz', 'bert', 'ivt', 'clip')):
    from ivt_jax.weights import pretrained
    params, report = pretrained.load_pretrained(config, jax.device_get(params))
    logging.info('pretrained weights:\n%s', report)
    params = jax.device_put(params, shardings)
  return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment; returns the final metrics dict (also in <workdir>/metrics.json).

  One run per workdir: process 0 holds the workdir's lock for the whole run (ivt_jax.training.run_guard)."""
  workdir = paths.resolve(workdir, 'workdir')
  paths.makedirs(workdir)
  lock = run_guard.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from input_pipeline import pipeline as pipeline_lib
  from input_pipeline import sampler as sampler_lib
  from input_pipeline import prepare as prepare_lib

  t_start = time.time()
  config = _resolve_data_paths(config, workdir)
  config, prepared, tokenizer, encoder, mesh, abstract, shardings = evaluate_lib.build(config, workdir)
  logging.debug('prepared %s', prepared)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  train_source = prepare_lib.open_split(prepared, 'train')
  steps_per_epoch = sampler_lib.steps_per_epoch(config, train_source)
  total_steps = config.total_steps or int(round(config.num_epochs * steps_per_epoch))  # num_epochs may be 2.5
  eval_every = max(1, config.eval_every_epochs * steps_per_epoch)
  global_batch = config.data.ids_per_batch * config.data.images_per_id
  levels = len(shapes.mla_levels(config))
  if global_batch % jax.process_count():
    raise ValueError(f'data.ids_per_batch x data.images_per_id = {global_batch} is not divisible by the '
                     f'{jax.process_count()} processes')
  if global_batch % mesh.size:
    raise ValueError(f'the batch of {global_batch} samples does not split over the {mesh.size} devices '
                     '(data.ids_per_batch x data.images_per_id must be a multiple of the device count)')

  logging.debug('%d steps per epoch, %d steps: compiling the step', steps_per_epoch, total_steps)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(lambda p: step_lib.create_state(p, tx, rng), abstract)
  state_shardings = sharding_lib.state_shardings(abstract_state, tx, shardings, mesh)
  data_iter = pipeline_lib.train_iterator(config, train_source, tokenizer, seed=config.seed,
                                          shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = prefetch.training_feed(config, data_iter, mesh)
  manager = checkpoints.training_manager(workdir, save_every=config.checkpoint_every_steps,
                                         max_to_keep=config.max_checkpoints)
  best_manager = checkpoints.params_manager(paths.join(workdir, 'best'))
  latest = checkpoints.latest_meta(manager)
  if latest is not None:  # before anything is restored: a changed model would fail there, less clearly
    run_guard.check_resume_config(latest[1].get('config'), config.to_dict(),
                                  f'{workdir} (checkpoint of step {latest[0]})')
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
  class_table = evaluate_lib.class_table(config, prepared)
  gathered = step_setup.gather_shardings(config, shardings, mesh)
  chunk = step_setup.contrastive_chunk(config, global_batch)
  step_setup.check_text_packing(config, chunk)
  make_step = lambda text_lengths, packed: step_setup.jit_train_step(
      encoder, tx, schedule, steps_per_epoch, text_lengths, state_shardings, mesh, class_table, gathered, chunk,
      packed)
  # XLA compiles the step in a thread while this one initializes or restores the state.
  train_step = _StepsByLength(make_step, target, config, global_batch, mesh)
  restored = checkpoints.restore_training(manager, target, data_iter)
  if restored is None:
    params = _init_params(config, encoder, shardings, rng)
    state = jax.jit(lambda p: step_lib.create_state(p, tx, rng), out_shardings=state_shardings)(params)
    meta = {'best_val': None, 'best_step': None}
  else:
    state, meta = restored
    logging.info('resumed from step %d', int(state.step))
  embed_args = (config, encoder, mesh, shardings, prepared, tokenizer)
  has_val = prepared.split_sizes.get('val', 0) > 0

  embedder = evaluate_lib.Embedder(encoder, mesh, shardings)  # compiled at the first evaluation, then reused

  def run_eval(params, split):
    metrics, emb, sim, source = evaluate_lib.run_evaluation(config, params, *embed_args[1:], split,
                                                            embedder=embedder)
    return metrics, emb, sim, source

  def save_meta(step):
    return dict(meta, step=int(step), config=config.to_dict(), tokenizer=tokenizer.identity())

  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  preemption = _Preemption()
  step = int(state.step)
  progress = console.Progress(total_steps, start=step, enabled=jax.process_index() == 0)
  pending = None  # metrics of the previous step, checked one step late to keep dispatch asynchronous
  t_log, step_log = time.time(), step

  def check(pending):
    m_step, m = pending
    m = jax.device_get(m)
    if not m['finite'] > 0:
      raise NonFiniteError(f'non-finite loss or gradient at step {m_step} (loss={m["loss"]}, '
                           f'grad_norm={m["grad_norm"]}); training stopped, the last good checkpoint is kept '
                           f'(latest saved step: {manager.latest_step()})')
    if m.get('text_fits', 1.0) < 1:  # the loop gives every batch the slots it needs: our bug if not
      raise RuntimeError(f'step {m_step}: the packed texts needed more slots than the step was compiled for')
    if m.get('bmm_fits', 1.0) < 1:
      raise ValueError(f'step {m_step}: a BMM keep mask keeps more image tokens than the removal path holds '
                       f'(data.bmm_drops=fixed promises exactly floor(data.bmm_ratio x tokens) drops per row); the '
                       f'step was skipped. Set model.bmm_tokens=mask to run such masks')
    return m

  mesh_text = ' x '.join(f'{k} {v}' for k, v in mesh.shape.items())
  n_proc = jax.process_count()
  logging.info('training %s: steps %d to %d (%d per epoch), %d samples x %d MLA levels (%s) per step; mesh %s, %d '
               'process%s', config.data.name, step, total_steps, steps_per_epoch, global_batch, levels,
               ', '.join(shapes.mla_levels(config)), mesh_text, n_proc, 'es' if n_proc > 1 else '')
  logging.debug('training from step %d to step %d', step, total_steps)
  try:
    while step < total_steps:
      state, m = train_step(state, next(data_iter))
      step += 1
      if pending is not None:
        last = check(pending)
      pending = (step, m)
      report(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        last = check(pending)
        elapsed = time.time() - t_log
        pairs_per_s = (step - step_log) * global_batch * levels / max(elapsed, 1e-9)
        progress.update(step, float(last['loss']), float(last['learning_rate']))
        writer.write_scalars(step, {'train/loss': float(last['loss']),
                                    'train/grad_norm': float(last['grad_norm']),
                                    'train/learning_rate': float(last['learning_rate']),
                                    'train/pairs_per_second': pairs_per_s})
        t_log, step_log = time.time(), step
      if has_val and (step % eval_every == 0 or step == total_steps):
        check(pending)
        progress.clear()
        logging.debug('step %d: evaluating on val', step)
        val, *_ = run_eval(state.params, 'val')
        writer.write_scalars(step, {f'val/{k}': v for k, v in val.items()})
        logging.info('step %d val: %s', step, _metrics_line(val))
        if meta['best_val'] is None or val['r1'] > meta['best_val']['r1']:
          meta.update(best_val=val, best_step=step)
          checkpoints.save_params(best_manager, step, state.params, save_meta(step))
      if preemption.reached():
        check(pending)
        checkpoints.save_training(manager, step, state, data_iter, save_meta(step), force=True)
        checkpoints.wait(manager)
        logging.warning('checkpoint saved at step %d after SIGTERM; exiting.', step)
        return {'preempted_at_step': step}
      if manager.should_save(step) or step == total_steps:  # the last step too, wherever it falls
        check(pending)
        checkpoints.save_training(manager, step, state, data_iter, save_meta(step), force=step == total_steps)
    if pending is not None:
      check(pending)
    checkpoints.wait(manager)
  finally:
    progress.clear()
    preemption.restore()
    data_iter.close()

  # Final: the best-by-validation parameters (or the last ones without a val split) on test.
  params = state.params
  if has_val and best_manager.latest_step() is not None:
    params, _ = checkpoints.restore_params(paths.join(workdir, 'best'), abstract, shardings)
  logging.debug('evaluating on test')
  test, emb, sim, source = run_eval(params, 'test')
  writer.write_scalars(total_steps, {f'test/{k}': v for k, v in test.items()})
  writer.flush()
  result = {'test': test, 'best_val': meta['best_val'], 'best_step': meta['best_step'],
            'steps': total_steps, 'seconds': time.time() - t_start}
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.join(workdir, 'metrics.json'), json.dumps(result, indent=2))
    _retrieval_picture(config, emb, sim, source, paths.join(workdir, 'retrieval.png'))
  logging.debug('test: %s', _metrics_line(test))  # the summary below says it to a person
  if jax.process_index() == 0:
    print(_summary(result, workdir, prepare_lib.oddities_text(prepared.to_json())), flush=True)
  return result


METRIC_NAMES = (('r1', 'R@1'), ('r5', 'R@5'), ('r10', 'R@10'), ('mAP', 'mAP'), ('mINP', 'mINP'))


def _metrics_line(m: dict) -> str:
  return '  '.join(f'{name} {m[k]:.2f}' for k, name in METRIC_NAMES if k in m)


def _summary(result: dict, workdir: str, data_note: str = '') -> str:
  """The results table, what preparation left out or merged, and where the outputs are."""
  rows = []
  if result.get('best_val'):
    rows.append({'split': f'val (best, step {result["best_step"]})',
                 **{name: float(result['best_val'][k]) for k, name in METRIC_NAMES}})
  rows.append({'split': 'test', **{name: float(result['test'][k]) for k, name in METRIC_NAMES}})
  table = console.table(rows, ['split'] + [name for _, name in METRIC_NAMES])
  params_dir = paths.join(workdir, 'best' if result.get('best_val') else 'checkpoints')
  outputs = [f'  metrics      {paths.join(workdir, "metrics.json")}',
             f'  picture      {paths.join(workdir, "retrieval.png")}',
             f'  parameters   {params_dir}',
             f'  TensorBoard  tensorboard --logdir {workdir}']
  data = f'data: {data_note}\n' if data_note else ''
  return (f'\ntext-to-image retrieval, {result["steps"]} steps, {result["seconds"] / 60:.1f} min\n{table}\n'
          f'{data}outputs:\n' + '\n'.join(outputs))


def _retrieval_picture(config, emb, sim, source, path):
  from ivt_jax.evaluation import pictures as visualize
  from input_pipeline import prepare as prepare_lib
  records = {}
  def record(i):
    if i not in records:
      records[i] = prepare_lib.decode_example(source[int(i)])
    return records[i]
  rng = np.random.default_rng(config.seed)
  queries = rng.choice(len(emb['text_pid']), size=min(config.num_retrieval_examples, len(emb['text_pid'])),
                       replace=False)
  captions, ranked, hits = [], [], []
  for q in queries:
    rec = record(emb['text_image_index'][q])
    captions.append(_caption_of(rec, emb, q))
    top = np.argsort(-sim[q], kind='stable')[:10]
    ranked.append([record(emb['image_index'][g])['image'] for g in top])
    hits.append([bool(emb['image_pid'][g] == emb['text_pid'][q]) for g in top])
  h, w = config.data.image_size
  cell = (128, max(16, int(round(128 * w / h))))
  visualize.save_png(visualize.retrieval_grid(captions, ranked, hits, cell=cell), path)
  logging.debug('retrieval picture: %s', path)


def _caption_of(rec, emb, q):
  """The caption text of query q: queries are numbered over all captions in record order."""
  same_record = np.flatnonzero(emb['text_image_index'] == emb['text_image_index'][q])
  position = int(np.searchsorted(emb['text_index'][same_record], emb['text_index'][q]))
  return str(rec['captions'][position])
