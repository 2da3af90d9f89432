"""What the search API (ivt_jax/search/server.py) promises in its OpenAPI schema: the pages it answers, the
errors by status, the content types of its files, and 422 bodies in FastAPI's declared form
({"detail": [{"loc", "msg", "type"}]}) with messages a person can act on."""
from __future__ import annotations

from typing import Iterable, Optional

import pydantic

IMAGE_TYPES = {'.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.png': 'image/png', '.webp': 'image/webp'}

DESCRIPTIONS = {
    401: 'a token is required and was missing or wrong',
    403: 'the file resolves outside the indexed folders',
    404: 'no such row, or its file is gone',
    413: 'the request (its URL or body) is larger than the limit',
    503: 'too many queries are waiting: try again shortly',
}


class Error(pydantic.BaseModel):
  detail: str


class Frame(pydantic.BaseModel):
  """Where a person found in footage was: null for a person crop."""
  time: Optional[float] = pydantic.Field(None, description='seconds into the video; null for a still (a full '
                                                           'frame in an image file)')
  index: Optional[int] = pydantic.Field(None, description="the frame's index in the video stream; null for a still")
  box: list[float] = pydantic.Field(..., min_length=4, max_length=4,
                                    description="[x0, y0, x1, y1]: the person's box in the frame's pixels")
  score: Optional[float] = pydantic.Field(None, description="the detector's score")
  track: Optional[int] = pydantic.Field(None, description="the person's track within the video, when tracked")
  source: str = pydantic.Field(..., description='the detector that found the person')


class Result(pydantic.BaseModel):
  rank: int
  id: int
  score: float
  name: str = pydantic.Field(..., description='the file, relative to its indexed folder; a video row\'s with its '
                                              'time ("cam1.mp4 @ 0:12.5")')
  frame: Optional[Frame] = pydantic.Field(None, description='for a person found in a frame of footage: the '
                                                            'moment and the box (GET /api/frame/{row} draws it)')


class _Page(pydantic.BaseModel):
  total: int
  offset: int
  k: int
  results: list[Result]


class SearchPage(_Page):
  query: str


class SimilarPage(_Page):
  id: int


def errors(*statuses: int, notes: Optional[dict] = None) -> dict:
  """FastAPI `responses=` for these error statuses, each with an Error body (`notes`: descriptions that differ
  from DESCRIPTIONS, by status)."""
  return {s: {'model': Error, 'description': (notes or {}).get(s, DESCRIPTIONS[s])} for s in statuses}


def content(media_types: Iterable[str], description: str) -> dict:
  """A response declared with these media types (binary bodies)."""
  schema = {'type': 'string', 'format': 'binary'}
  return {'description': description, 'content': {m: {'schema': schema} for m in dict.fromkeys(media_types)}}


def _message(error: dict, limits) -> str:
  name = str(error['loc'][-1]) if error.get('loc') else 'the request'
  kind, given = error.get('type', ''), error.get('input')
  if name in ('q',) and kind == 'string_pattern_mismatch':
    return 'empty query: describe the person to find'
  if name == 'q' and kind == 'string_too_long':
    return f'query longer than {limits.max_query_chars} characters ({len(str(given))})'
  if name == 'q' and kind in ('string_too_short', 'missing'):
    return 'empty query: describe the person to find'
  bounds = {'k': (1, limits.max_k), 'offset': (0, limits.max_offset)}
  if kind in ('greater_than_equal', 'less_than_equal'):
    if name in bounds:
      return f'{name} must be {bounds[name][0]}..{bounds[name][1]}, got {given}'
    return f'{name} must be 0 or more, got {given}'
  return f'{name}: {error.get("msg", "invalid")}'


def validation_handler(limits):
  """An exception handler for FastAPI's RequestValidationError: status 422 with the declared body."""
  from fastapi import responses  # pylint: disable=g-import-not-at-top

  async def handle(_, exc):
    detail = [{'loc': [x if isinstance(x, (int, str)) else str(x) for x in e.get('loc', ())],
               'msg': _message(e, limits), 'type': str(e.get('type', 'value_error'))} for e in exc.errors()]
    return responses.JSONResponse({'detail': detail}, status_code=422)
  return handle
