"""Synthetic long-context tasks, generated on the fly from a seeded numpy Generator.

Each generator returns a `Sample`: `length` tokens and a mask of the answer tokens
(what retrieval evaluation scores, teacher-forced). Filler text ("haystack") is a window of
the code corpus, so the tasks sit inside real text. The evaluation issue adds the RULER
families here.

- `niah`: needle in a haystack. `num_needles` lines "# key <K> holds <V>" at random depths
  (K, V random UUIDs, optionally cut to `uuid_chars` hex digits; or K of `uuid_chars`
  letters of a `key_alphabet`), then at the end
  `num_queries` lines "# recall <K> -> <V>"; the answer is V.
- `mqar`: multi-query associative recall (Zoology): "k:v" pairs, then the keys in another
  order, each followed by its value; the answer is every queried value. Packed between
  code windows with document separators.
"""

from __future__ import annotations

import dataclasses
import string
import uuid

import numpy as np

# Key alphabets: `latin` letters also fill the code around the task; `greek` letters
# never do, so a key matches only its own pair (Zoology keeps keys out of the filler).
KEY_ALPHABETS = {"latin": string.ascii_lowercase, "greek": "αβγδεζηθικλμνξοπρστυφχψω"}


@dataclasses.dataclass(frozen=True)
class NIAHConfig:
  num_needles: int = 4
  num_queries: int = 2
  uuid_chars: int = 36  # 36 = the full UUID text; fewer = that many hex digits
  # "uuid": keys like values; else one of KEY_ALPHABETS (`uuid_chars` letters, distinct
  # keys): `greek` letters never occur in the code haystack, as MQAR's keys.
  key_alphabet: str = "uuid"
  value_alphabet: str = "uuid"  # or "digits": `uuid_chars` decimal digits (RULER's numbers)
  needle_format: str = "\n# key {key} holds {value}\n"
  query_format: str = "\n# recall {key} -> "  # the answer (the value) follows
  # False: each needle at its own depth (RULER); True: all of them one after another at
  # one depth, as MQAR's block of pairs
  together: bool = False

  def __post_init__(self):
    if not 1 <= self.num_queries <= self.num_needles:
      raise ValueError(
        f"niah.num_queries={self.num_queries} must be in [1, niah.num_needles={self.num_needles}]"
      )
    if not 1 <= self.uuid_chars <= 36:
      raise ValueError(f"niah.uuid_chars={self.uuid_chars} must be in [1, 36]")
    if self.key_alphabet != "uuid" and self.key_alphabet not in KEY_ALPHABETS:
      raise ValueError(
        f"niah.key_alphabet={self.key_alphabet!r} is not one of {('uuid', *KEY_ALPHABETS)}"
      )
    if self.value_alphabet not in ("uuid", "digits"):
      raise ValueError(
        f"niah.value_alphabet={self.value_alphabet!r} is not one of ('uuid', 'digits')"
      )
    if self.key_alphabet != "uuid":
      if self.num_needles > len(KEY_ALPHABETS[self.key_alphabet]) ** self.uuid_chars:
        raise ValueError(
          f"niah.num_needles={self.num_needles} distinct keys do not exist with "
          f"niah.uuid_chars={self.uuid_chars} letters of {self.key_alphabet!r}"
        )


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  num_pairs: int = 16
  num_queries: int = 8
  key_len: int = 3
  value_len: int = 3
  separator: str = ":"  # between key and value; "" = Zoology's adjacent key-value tokens
  key_alphabet: str = "latin"  # one of KEY_ALPHABETS; values are digits
  # "block": Zoology's layout, the queries right after the pairs; "spread": the queries at
  # uniformly random offsets of the code that fills the rest of the sequence, so the
  # key-to-query distance grows with the length.
  layout: str = "block"
  # "spread" only: the pairs start after a code prefix of a random share in [0, pairs_at]
  # of the filler (0: at the start, where an attention sink would hold them).
  pairs_at: float = 0.0

  def __post_init__(self):
    if self.layout not in ("block", "spread"):
      raise ValueError(f"mqar.layout={self.layout!r} is not one of ('block', 'spread')")
    if not 0.0 <= self.pairs_at < 1.0:
      raise ValueError(f"mqar.pairs_at={self.pairs_at} must be in [0, 1)")
    if self.pairs_at and self.layout != "spread":
      raise ValueError(f"mqar.pairs_at={self.pairs_at} needs layout='spread', not {self.layout!r}")
    if not 1 <= self.num_queries <= self.num_pairs:
      raise ValueError(
        f"mqar.num_queries={self.num_queries} must be in [1, mqar.num_pairs={self.num_pairs}]"
      )
    if self.key_alphabet not in KEY_ALPHABETS:
      raise ValueError(
        f"mqar.key_alphabet={self.key_alphabet!r} is not one of {tuple(KEY_ALPHABETS)}"
      )
    if self.num_pairs > len(KEY_ALPHABETS[self.key_alphabet]) ** self.key_len:
      raise ValueError(
        f"mqar.num_pairs={self.num_pairs} distinct keys do not exist with "
        f"mqar.key_len={self.key_len} letters of {self.key_alphabet!r}"
      )


@dataclasses.dataclass
class Sample:
  tokens: np.ndarray  # int32 [length]
  answer_mask: np.ndarray  # bool [length]: True on answer tokens
  # `niah` and `mqar`: per query, in order, the position of its needle's (pair's) value,
  # the copy the answer repeats; subq_jax.evaluate reads it for the routing diagnostic and
  # for accuracy by distance
  needle_at: np.ndarray | None = None


def random_uuid(rng: np.random.Generator, chars: int) -> str:
  text = str(uuid.UUID(bytes=rng.bytes(16), version=4))
  return text if chars >= 36 else text.replace("-", "")[:chars]


def code_window(rng: np.random.Generator, stream: np.ndarray, length: int) -> np.ndarray:
  """`length` consecutive corpus tokens from a random offset (wrapping around)."""
  if length <= 0:
    return np.zeros((0,), np.int32)
  start = int(rng.integers(0, len(stream)))
  idx = (start + np.arange(length)) % len(stream)
  return stream[idx]


def _concat(parts):
  """[(tokens, is_answer)] -> Sample."""
  tokens = np.concatenate([p for p, _ in parts]).astype(np.int32)
  mask = np.concatenate([np.full(len(p), a, bool) for p, a in parts])
  return Sample(tokens, mask)


def _fit(sample: Sample, length: int, what: str) -> Sample:
  if len(sample.tokens) != length:
    raise ValueError(f"{what}: built {len(sample.tokens)} tokens, expected {length}")
  return sample


def niah(rng, tokenizer, stream, length: int, cfg: NIAHConfig, depths=None) -> Sample:
  """Needles at random (or given, in [0, 1]) depths of a code haystack; queries at the end."""
  enc = tokenizer.encode
  if cfg.key_alphabet == "uuid":
    keys = [random_uuid(rng, cfg.uuid_chars) for _ in range(cfg.num_needles)]
  else:
    letters, keys = KEY_ALPHABETS[cfg.key_alphabet], []
    while len(keys) < cfg.num_needles:  # distinct keys
      key = "".join(letters[i] for i in rng.integers(0, len(letters), size=cfg.uuid_chars))
      keys += [key] if key not in keys else []
  if cfg.value_alphabet == "digits":
    values = ["".join(map(str, rng.integers(0, 10, cfg.uuid_chars))) for _ in keys]
  else:
    values = [random_uuid(rng, cfg.uuid_chars) for _ in range(cfg.num_needles)]
  needles = [
    enc(cfg.needle_format.format(key=k, value=v)) for k, v in zip(keys, values, strict=True)
  ]
  asked = rng.permutation(cfg.num_needles)[: cfg.num_queries]
  query = []
  for i in asked:
    query += [(enc(cfg.query_format.format(key=keys[i])), False), (enc(values[i]), True)]
  query_len = sum(len(p) for p, _ in query)
  hay_len = length - query_len - sum(len(n) for n in needles)
  if hay_len < 0:
    raise ValueError(
      f"niah: length={length} is too short for {cfg.num_needles} needles and "
      f"{cfg.num_queries} queries of {cfg.uuid_chars} chars"
    )
  hay = code_window(rng, stream, hay_len)
  if depths is None:
    depths = np.full(cfg.num_needles, rng.random()) if cfg.together else rng.random(cfg.num_needles)
  cuts = np.sort((np.asarray(depths, np.float64) * hay_len).astype(np.int64))
  parts, prev, value_at = [], 0, []
  for cut, needle, key in zip(cuts, needles, keys, strict=True):
    parts += [(hay[prev:cut], False), (needle, False)]
    start = sum(len(p) for p, _ in parts) - len(needle)
    value_at.append(start + len(enc(cfg.needle_format.split("{value}")[0].format(key=key))))
    prev = cut
  parts.append((hay[prev:], False))
  sample = _fit(_concat(parts + query), length, "niah")
  sample.needle_at = np.asarray([value_at[i] for i in asked], np.int64)
  return sample


def mqar(rng, tokenizer, stream, length: int, cfg: MQARConfig) -> Sample:
  """Key-value pairs then queries: packed between code windows with separators
  (layout "block"), or the pairs first and the queries scattered through code ("spread")."""
  enc = tokenizer.encode

  def word(alphabet, n):
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))

  keys = []
  while len(keys) < cfg.num_pairs:  # distinct keys
    k = word(KEY_ALPHABETS[cfg.key_alphabet], cfg.key_len)
    if k not in keys:
      keys.append(k)
  values = [word(string.digits, cfg.value_len) for _ in keys]
  kv_sep = cfg.separator
  pairs = [f"{k}{kv_sep}{v}" for k, v in zip(keys, values, strict=True)]
  parts = [(enc("mqar " + " ".join(pairs)), False), (enc(" |"), False)]
  # where each pair's value starts, from the pairs' start
  value_at = [len(enc("mqar " + " ".join([*pairs[:i], k + kv_sep]))) for i, k in enumerate(keys)]
  asked = rng.permutation(cfg.num_pairs)[: cfg.num_queries]
  queries = [[(enc(f" {keys[i]}{kv_sep}"), False), (enc(values[i]), True)] for i in asked]
  sep = np.asarray([tokenizer.sep_id], np.int32)
  if cfg.layout == "spread":
    free = length - 1 - sum(len(p) for p, _ in parts + sum(queries, []))
    if free < 0:
      raise ValueError(f"mqar: length={length} is too short for {cfg.num_pairs} pairs")
    fill = code_window(rng, stream, free)
    start = int(rng.integers(0, int(cfg.pairs_at * free) + 1)) if cfg.pairs_at else 0
    parts = [(fill[:start], False), (sep, False)] + parts
    prev = start
    cuts = np.sort(rng.integers(start, free + 1, len(queries)))
    for cut, query in zip(cuts, queries, strict=True):
      parts += [(fill[prev:cut], False)] + query
      prev = cut
    sample = _fit(_concat(parts + [(fill[prev:], False)]), length, "mqar")
    sample.needle_at = np.asarray([start + 1 + value_at[i] for i in asked], np.int64)
    return sample
  parts += sum(queries, [])
  doc_len = sum(len(p) for p, _ in parts)
  free = length - doc_len - 2
  if free < 0:
    raise ValueError(f"mqar: length={length} is too short for {cfg.num_pairs} pairs")
  before = int(rng.integers(0, free + 1))
  parts = (
    [(code_window(rng, stream, before), False), (sep, False)]
    + parts
    + [(sep, False), (code_window(rng, stream, free - before), False)]
  )
  sample = _fit(_concat(parts), length, "mqar")
  sample.needle_at = np.asarray([before + 1 + value_at[i] for i in asked], np.int64)
  return sample
