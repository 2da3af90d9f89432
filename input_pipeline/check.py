r"""Check a dataset folder before training: every problem in one report, nothing written into the folder.

  python -m input_pipeline.check --config=configs/cuhk.py [--config.data.manual_dir=DIR] [--json=report.json]
  python -m input_pipeline.check --dataset=rstpreid --manual_dir=~/data/RSTPReid

It reads the annotation file and decodes every image as training would, and prints: the layout found (and,
when the files are one folder off, the folder meant), per split the identities, images and captions, every bad
record with its reason (grouped by kind, the first 20 of each and a count), records merged into others and
captions repeated or shared by different people, captions that look wrong (code-like, no letters, far longer or
shorter than the rest), and whether the tokenizer is ready. Exit status 0 when training would start on this
folder (bad records left aside only with data.skip_bad_records=True), 1 otherwise, 2 for bad flags.
"""
import collections
import json
import logging
import os
import re
import sys
from typing import Any, Optional

from input_pipeline.datasets import records

NAMES = ('cuhk_pedes', 'icfg_pedes', 'rstpreid')
SHOWN = 20
_CODE = re.compile(r'[{}<>;=\\]|https?://|\bdef\b|\breturn\b|\bnull\b|\bNaN\b')


def nearby_folder(name: str, manual_dir: str) -> Optional[str]:
  """A folder one level up or down that holds the format's json, when manual_dir does not."""
  fmt = records.get_format(name)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  candidates = [os.path.dirname(manual_dir)]
  if os.path.isdir(manual_dir):
    candidates += sorted(os.path.join(manual_dir, d) for d in os.listdir(manual_dir)
                         if os.path.isdir(os.path.join(manual_dir, d)))
  for folder in candidates:
    if any(os.path.isfile(os.path.join(folder, j)) for j in fmt.json_names):
      return folder
  return None


def _reason_kind(reason: str) -> str:
  """'image file /x/y.jpg does not exist ...' -> 'image file does not exist or is not a regular file'."""
  words = [w for w in reason.split() if not re.search(r'[/\\]|^\d+$|^[\'"(]', w)]
  return ' '.join(words)[:90]


def caption_warnings(recs: list) -> dict[str, list[dict]]:
  """Captions that look wrong, by kind: code-like, no letters, far longer or shorter than the rest."""
  lengths = sorted(len(c.split()) for r in recs for c in r.captions) or [0]
  median = lengths[len(lengths) // 2]
  out = collections.defaultdict(list)
  for r in recs:
    for c in r.captions:
      n = len(c.split())
      entry = {'record': r.index, 'image': r.image_path, 'id': r.person_id, 'caption': c[:160]}
      if not re.search(r'[^\W\d_]', c):
        out['no letters'].append(entry)
      elif _CODE.search(c):
        out['code-like (brackets, markup, URLs)'].append(entry)
      if median and n > max(4 * median, 120):
        out[f'far too long (over 4x the median of {median} words, and over 120)'].append(entry)
      elif n < 3:
        out['far too short (under 3 words)'].append(entry)
  return dict(out)


def tokenizer_readiness(data: Any) -> tuple[bool, str]:
  if data.tokenizer == 'wordpiece':
    vocab = os.path.expanduser(data.vocab_file or '')
    if vocab and os.path.isfile(vocab):
      return True, f'WordPiece vocabulary {vocab}'
    return False, (f'data.tokenizer=wordpiece needs data.vocab_file, the bert-base-uncased vocab.txt (got '
                   f'{data.vocab_file!r}, not a file)')
  if data.tokenizer == 'sentencepiece':
    return True, 'SentencePiece: trained on the training captions at preparation'
  if data.tokenizer == 'clip_bpe':
    return True, "CLIP's BPE (the merges file ships with open_clip)"
  return True, f'data.tokenizer={data.tokenizer}'


def check(name: str, manual_dir: str, data: Any = None, workers: int = 0) -> dict[str, Any]:
  """The report (a json-ready dict); reads the folder, writes nothing."""
  report: dict[str, Any] = {'dataset': name, 'manual_dir': os.path.abspath(os.path.expanduser(manual_dir))}
  try:
    json_file = records.find_json(name, manual_dir)
  except records.ManualDirError as e:
    report.update(layout='not found', error=str(e), ready=False)
    near = nearby_folder(name, manual_dir)
    if near:
      report['meant'] = near
    return report
  report['layout'] = f'{os.path.basename(json_file)} + imgs/ in {os.path.dirname(json_file)}'
  skip = bool(getattr(data, 'skip_bad_records', False)) if data is not None else False
  workers = workers or max(1, min(8, os.cpu_count() or 1))
  try:
    with records.process_pool(workers) as pool:
      parsed = records.parse_records(name, manual_dir, skip_bad_records=True, check_images=True, workers=pool,
                                     val_fraction_ids=getattr(data, 'val_fraction_ids', None) or None)
  except records.RecordError as e:  # the file itself (not json, not a list): nothing else can be read
    report.update(error=str(e), ready=False)
    return report
  splits = {}
  for r in parsed.records:
    s = splits.setdefault(r.split, {'ids': set(), 'images': 0, 'captions': 0})
    s['ids'].add(r.person_id)
    s['images'] += 1
    s['captions'] += len(r.captions)
  report['splits'] = {k: {'ids': len(v['ids']), 'images': v['images'], 'captions': v['captions']}
                      for k, v in sorted(splits.items())}
  groups = collections.defaultdict(list)
  for b in parsed.bad:
    groups[_reason_kind(b.reason)].append(b.to_json())
  report['bad_records'] = {'count': len(parsed.bad),
                           'kinds': {k: {'count': len(v), 'first': v[:SHOWN]} for k, v in groups.items()}}
  report['merges'] = {**parsed.oddities(), 'merged_records': parsed.merged[:SHOWN]}
  warnings = caption_warnings(parsed.records)
  report['caption_warnings'] = {k: {'count': len(v), 'first': v[:SHOWN]} for k, v in warnings.items()}
  if data is not None:
    ok, said = tokenizer_readiness(data)
    report['tokenizer'] = {'ready': ok, 'said': said}
  else:
    ok = True
  missing = [s for s in ('train', 'test') if s not in report['splits']]
  if missing:
    report['missing_splits'] = missing
  report['ready'] = bool(ok and not missing and (not parsed.bad or skip))
  return report


def text(report: dict[str, Any]) -> str:
  """The report as a person reads it."""
  lines = [f'{report["dataset"]} in {report["manual_dir"]}: {report["layout"]}']
  if 'error' in report:
    lines.append(f'error: {report["error"]}')
    if report.get('meant'):
      lines.append(f'the files are in {report["meant"]}: did you mean --config.data.manual_dir={report["meant"]}?')
    lines.append('not ready: training would not start')
    return '\n'.join(lines)
  lines += ['', f'{"split":<6} {"ids":>7} {"images":>8} {"captions":>9}']
  for k, v in report['splits'].items():
    lines.append(f'{k:<6} {v["ids"]:>7} {v["images"]:>8} {v["captions"]:>9}')
  bad = report['bad_records']
  lines += ['', f'bad records: {bad["count"]}']
  for kind, g in bad['kinds'].items():
    lines.append(f'  {g["count"]} x {kind}')
    for b in g['first']:
      lines.append(f'    record {b["index"]} (id {b["person_id"]}, {b["image_path"]}): {b["reason"]}')
    if g['count'] > len(g['first']):
      lines.append(f'    ... and {g["count"] - len(g["first"])} more')
  m = report['merges']
  lines += [f'merged into an earlier record (same image and id): {m["num_merged_records"]}'
            + (f' (records {", ".join(map(str, m["merged_records"]))})' if m['merged_records'] else ''),
            f'captions repeated within a record: {m["num_repeated_captions"]}',
            f'caption texts on images of different people: {m["num_shared_captions"]}']
  for kind, g in report['caption_warnings'].items():
    lines.append(f'captions {kind}: {g["count"]}')
    for e in g['first'][:5]:
      lines.append(f'    record {e["record"]} (id {e["id"]}): {e["caption"]!r}')
  if 'tokenizer' in report:
    t = report['tokenizer']
    lines.append(f'tokenizer: {"ready" if t["ready"] else "NOT READY"}: {t["said"]}')
  if report.get('missing_splits'):
    lines.append(f'missing splits: {", ".join(report["missing_splits"])}')
  verdict = 'ready: training would start' if report['ready'] else 'not ready: training would not start'
  if bad['count'] and report['ready']:
    verdict += f' (data.skip_bad_records=True leaves the {bad["count"]} bad record(s) out)'
  elif bad['count']:
    verdict += ' (fix the records above, or set data.skip_bad_records=True to leave them out)'
  lines += ['', verdict]
  return '\n'.join(lines)


def main(argv=None) -> int:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'A dataset config (configs/*.py).', lock_config=True)
  flags.DEFINE_enum('dataset', None, list(NAMES), 'Instead of --config: the dataset format.')
  flags.DEFINE_string('manual_dir', None, 'With --dataset: the folder (default: the config\'s data.manual_dir).')
  flags.DEFINE_string('json', '', 'Also write the report as JSON here.')
  flags.DEFINE_integer('workers', 0, 'Processes decoding images (0: up to 8).')
  FLAGS = flags.FLAGS

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    if FLAGS.config is None and not (FLAGS.dataset and FLAGS.manual_dir):
      print('error: give --config=configs/NAME.py, or --dataset=NAME --manual_dir=DIR', file=sys.stderr)
      return 2
    data = FLAGS.config.data if FLAGS.config is not None else None
    name = FLAGS.dataset or data.name
    manual_dir = FLAGS.manual_dir or data.manual_dir
    if name not in NAMES:
      print(f'error: data.name={name!r}: one of {NAMES}', file=sys.stderr)
      return 2
    if FLAGS.verbosity < 1:  # the records' own "skipped N bad records" warning: the report says it all
      logging.getLogger().setLevel(logging.ERROR)
    report = check(name, manual_dir, data, FLAGS.workers)
    print(text(report))
    if FLAGS.json:
      with open(os.path.expanduser(FLAGS.json), 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1)
      print(f'report written to {FLAGS.json}')
    return 0 if report['ready'] else 1

  from input_pipeline import cli  # pylint: disable=g-import-not-at-top
  cli.run_app(run, argv)


if __name__ == '__main__':
  main()
