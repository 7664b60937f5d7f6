"""Long-context evaluation tasks: the RULER families, an MRCR-style task and MQAR.

Every generator is `fn(rng, source, length, **knobs) -> TaskSample`, seeded by a numpy
Generator and offline: filler comes from the embedded corpus (`Source`) or is written
here. `length` counts tokens of `source.tokenizer` (bytes for the byte tokenizer): the
prompt plus `max_new_tokens` (RULER's tokens_to_generate) fits in `length` and falls short
of it by less than one filler unit (a sentence, line, document, turn or word).

Formats follow RULER (NVIDIA/RULER scripts/data/synthetic, synthetic.yaml): the same
instructions, needle sentence, noise sentence, answer prefixes and scoring metric.
What replaces RULER's external text:
- Paul Graham essays (the "essay" haystack) -> windows of the corpus ("code" filler):
  Python stdlib source, documents joined by newlines; needles go in at line starts.
- wonderwords adjective-noun needle keys -> `ADJECTIVES` x `NOUNS` below (10,000 keys).
- wonderwords / randle words for CWE -> `Source.words`: lowercase words of 4-10 letters
  that occur at least twice in the corpus (identifiers, comments, docstrings).
- SQuAD / HotpotQA -> `qa_1`: templated entity-attribute documents (one gold document,
  distractors of the same template, one sharing the entity's first name); `qa_2`: a
  two-hop bridge (person -> company, company -> city) in two documents, among distractors.
  Names and values are pseudo-words, unique in a sample.
- OpenAI MRCR's conversations -> templated "Write a <form> about <topic>" turns whose
  responses are random sentences from the word lists here.
MQAR (Zoology) is text: "mqar k:v k:v ... |" then filler with each query line "\nk:v\n"
at uniformly drawn offsets; it is teacher-forced only (answers are `spans` in the text).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
from scipy.special import zeta

from subq_jax.data import corpus, tasks
from subq_jax.data.tokenizer import ByteTokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
# RULER's needle depths: 40 points from 0% to 100%.
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))

NIAH_TEMPLATE = (
  "Some special magic {type_v} are hidden within the following text. Make sure to memorize "
  "it. I will quiz you about the {type_v} afterwards.\n{context}\nWhat are all the special "
  "magic {type_v} for {query} mentioned in the provided text?"
  " The special magic {type_v} for {query} mentioned in the provided text are"
)
VT_TEMPLATE = (
  "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
  "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
  "above. Answer: According to the chain(s) of variable assignment in the text above, "
  "{num_v} variables are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
  "Below is a numbered list of words. In these words, some appear more often than others. "
  "Memorize the ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most "
  "common words in the above list? Answer: The top {num_cw} words that appear most often in "
  "the list are:"
)
FWE_TEMPLATE = (
  "Read the following coded text and track the frequency of each coded word. Find the three "
  "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
  "Please ignore the dots '....'. What are the three most frequently appeared words in the "
  "above coded text? Answer: According to the coded text above, the three most frequently "
  "appeared words are:"
)
_QA_ASK = (
  "Answer the question based on the given documents. Only give me the answer and do not "
  "output any other words."
)
QA_TEMPLATE = (
  _QA_ASK + "\n\nThe following are given documents.\n\n{context}\n\n" + _QA_ASK + "\n\n"
  "Question: {query} Answer:"
)
MRCR_QUERY = (
  "User: Prepend {prefix} to the {ordinal} (1 indexed) {form} about {topic}. Do not include "
  "any other text in your response.\nAssistant: "
)

# fmt: off
ADJECTIVES = (
  "able", "acid", "agile", "amber", "ample", "angry", "arid", "awake", "bare", "bold",
  "brave", "brief", "bright", "broad", "busy", "calm", "cheap", "chief", "civil", "clean",
  "clear", "close", "cold", "cool", "crisp", "cruel", "curly", "damp", "dark", "dear",
  "deep", "dense", "dizzy", "dry", "dull", "eager", "early", "empty", "equal", "even",
  "exact", "faint", "fair", "false", "fancy", "fast", "fierce", "fine", "firm", "flat",
  "fond", "fresh", "full", "fuzzy", "giant", "glad", "grand", "great", "green", "grim",
  "happy", "hard", "harsh", "heavy", "hollow", "huge", "humble", "icy", "idle", "jolly",
  "keen", "kind", "large", "late", "lazy", "light", "little", "lively", "long", "loud",
  "lucky", "mild", "misty", "modern", "narrow", "neat", "noble", "odd", "pale", "plain",
  "polite", "proud", "quick", "quiet", "rapid", "rare", "rich", "rough", "round", "royal",
)
NOUNS = (
  "acorn", "anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "blanket", "boat",
  "bottle", "bridge", "brook", "bucket", "cabin", "camera", "candle", "canyon", "carpet",
  "castle", "cellar", "chair", "cherry", "circle", "cloud", "coast", "comet", "copper",
  "cradle", "crown", "desert", "diamond", "dragon", "drum", "eagle", "engine", "falcon",
  "feather", "fence", "field", "flute", "forest", "fountain", "garden", "glacier", "guitar",
  "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle", "ladder", "lantern",
  "lemon", "letter", "magnet", "maple", "marble", "meadow", "mirror", "monkey", "needle",
  "orchard", "otter", "palace", "parrot", "pebble", "pencil", "piano", "pillow", "planet",
  "pocket", "quarry", "rabbit", "ribbon", "river", "rocket", "saddle", "scarf", "shadow",
  "shovel", "silver", "sparrow", "spider", "statue", "summit", "temple", "thunder", "tiger",
  "timber", "tower", "tunnel", "valley", "velvet", "violin", "wagon", "walnut", "window",
)
VERBS = (
  "carries", "chases", "climbs", "crosses", "dances", "drifts", "follows", "gathers",
  "guards", "hides", "holds", "hums", "jumps", "lifts", "listens", "marches", "paints",
  "plays", "pulls", "races", "rests", "rolls", "sails", "shines", "sings", "sleeps",
  "spins", "swims", "tumbles", "waits", "wanders", "watches", "whispers", "winds",
)
PREPOSITIONS = ("above", "across", "behind", "beside", "beyond", "inside", "near", "under")
MRCR_FORMS = ("poem", "short story", "riddle", "song", "letter", "speech", "fable", "limerick")
MRCR_TOPICS = (
  "tapirs", "lighthouses", "volcanoes", "penguins", "libraries", "trains", "owls", "glaciers",
  "bakeries", "comets", "foxes", "harbors", "orchards", "robots", "deserts", "whales",
  "bicycles", "castles", "rainstorms", "markets", "bees", "bridges", "kites", "tigers",
)
PROFESSIONS = (
  "architect", "baker", "botanist", "carpenter", "chemist", "composer", "engineer", "farmer",
  "geologist", "historian", "journalist", "librarian", "painter", "pilot", "sculptor",
  "surgeon", "teacher", "translator", "veterinarian", "weaver",
)
INDUSTRIES = (
  "shipping", "software", "textile", "mining", "publishing", "robotics", "furniture",
  "pharmaceutical", "aerospace", "farming", "insurance", "glassware",
)
# fmt: on

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class TaskSample:
  """One evaluation sample as text.

  The model reads `prompt` = `context` + `query` and continues it; `answers` are the
  references that `scoring.score(metric, prediction, answers, meta.get("prefix", ""))`
  compares with the continuation. `target` is a reference continuation (for teacher
  forcing or training), `spans` are [start, end) character offsets of answers inside
  `prompt` (MQAR, whose queries are all in the text), and `meta` says how the sample was
  built (filler, depths, counts, key-query distances), JSON-serialisable.
  """

  task: str
  context: str
  query: str
  answers: tuple[str, ...]
  target: str
  metric: str
  max_new_tokens: int
  meta: dict
  spans: tuple[tuple[int, int], ...] = ()

  @property
  def prompt(self) -> str:
    return self.context + self.query

  def answer_spans(self) -> list[tuple[int, int]]:
    """Character spans, in `prompt + target`, of every answer that teacher forcing scores."""
    out = list(self.spans)
    base, pos = len(self.prompt), 0
    for a in self.answers if self.target else ():
      i = self.target.find(a, pos)
      if i < 0:  # MRCR-like targets hold the answer whole
        continue
      out.append((base + i, base + i + len(a)))
      pos = i + len(a)
    return out

  def to_sample(self, tokenizer, length: int | None = None) -> tasks.Sample:
    """`prompt + target` as a tasks.Sample (tokens, answer_mask), right-padded to `length`."""
    text = self.prompt + self.target
    cuts, parts, prev = self.answer_spans(), [], 0
    for a, b in sorted(cuts):
      parts += [(tokenizer.encode(text[prev:a]), False), (tokenizer.encode(text[a:b]), True)]
      prev = b
    parts.append((tokenizer.encode(text[prev:]), False))
    tokens = np.concatenate([p for p, _ in parts]).astype(np.int32)
    mask = np.concatenate([np.full(len(p), m, bool) for p, m in parts])
    if length is not None:
      if len(tokens) > length:
        raise ValueError(f"{self.task}: {len(tokens)} tokens do not fit in length={length}")
      pad = length - len(tokens)
      tokens = np.concatenate([tokens, np.full(pad, tokenizer.pad_id, np.int32)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    return tasks.Sample(tokens, mask)


_WORD_RE = re.compile(r"(?<![A-Za-z0-9_])[a-z]{4,10}(?![A-Za-z0-9_])")


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """Where filler comes from: a split of the embedded corpus, read with `tokenizer`.

  Evaluation defaults to the validation split, which training does not see.
  """

  tokenizer: object = dataclasses.field(default_factory=ByteTokenizer)
  split: str = "validation"
  val_fraction: float = 0.05
  root: str | None = None

  @functools.cached_property
  def stream(self) -> np.ndarray:
    return corpus.token_stream(self.tokenizer, self.split, self.val_fraction, self.root)

  @functools.cached_property
  def words(self) -> tuple[str, ...]:
    """Every corpus word (all splits) of 4-10 lowercase letters seen at least twice, sorted."""
    counts = Counter()
    for _, text in corpus.load_documents(self.root):
      counts.update(_WORD_RE.findall(text))
    return tuple(sorted(w for w, c in counts.items() if c >= 2))

  def count(self, text: str) -> int:
    return len(self.tokenizer.encode(text))

  def code(self, seed: int, n: int) -> str:
    """About `n` tokens of corpus text from the offset that `seed` draws (same for every n)."""
    if n <= 0:
      return ""
    ids = tasks.code_window(np.random.default_rng(seed), self.stream, n)
    ids = np.where(ids == self.tokenizer.sep_id, self.tokenizer.encode("\n")[0], ids)
    if isinstance(self.tokenizer, ByteTokenizer):
      # A window may cut a multi-byte character at its ends; dropping the pieces keeps the
      # text no longer than n tokens.
      return ids.astype(np.uint8).tobytes().decode("utf-8", errors="ignore")
    return self.tokenizer.decode(ids)


@functools.lru_cache(maxsize=4)
def default_source(split: str = "validation") -> Source:
  return Source(split=split)


# ----------------------------------------------------------------------------- helpers


def _seed(rng: np.random.Generator) -> int:
  return int(rng.integers(0, 2**63 - 1))


def _pseudo_words(rng, k: int, used: set, syllables: int = 3) -> list[str]:
  """`k` new capitalised consonant-vowel pseudo-words (all the same length, so none is a
  substring of another), distinct from each other and from `used` (which they join)."""
  out = []
  while len(out) < k:
    c = rng.choice(list(_CONSONANTS), syllables)
    v = rng.choice(list(_VOWELS), syllables)
    w = "".join(a + b for a, b in zip(c, v, strict=True)).capitalize()
    if w not in used:
      used.add(w)
      out.append(w)
  return out


def _word_keys(rng, k: int, exclude=(), replace=False) -> list[str]:
  """Adjective-noun keys, as RULER's wonderwords keys ("fresh-harbor")."""
  total = len(ADJECTIVES) * len(NOUNS)
  bad = {
    ADJECTIVES.index(a) * len(NOUNS) + NOUNS.index(n) for a, n in (x.split("-") for x in exclude)
  }
  if replace:
    idx = rng.integers(0, total, k)
    while bad and np.isin(idx, list(bad)).any():
      hit = np.isin(idx, list(bad))
      idx[hit] = rng.integers(0, total, int(hit.sum()))
  else:
    pool = np.setdiff1d(np.arange(total), list(bad))
    if k > len(pool):
      raise ValueError(f"{k} distinct word keys asked, {len(pool)} available")
    idx = rng.choice(pool, k, replace=False)
  return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in idx]


def _random(rng, kind: str, k: int, exclude=(), replace=False) -> list[str]:
  """`k` RULER needle keys or values: "words", 7-digit "numbers" or "uuids"."""
  if kind == "words":
    return _word_keys(rng, k, exclude, replace)
  if kind == "numbers":
    return [str(x) for x in rng.integers(10**6, 10**7, k)]
  if kind == "uuids":
    return [tasks.random_uuid(rng, 36) for _ in range(k)]
  raise ValueError(f"needle type {kind!r} is not one of ('words', 'numbers', 'uuids')")


def _a(word: str) -> str:
  return ("an " if word[0] in "aeiou" else "a ") + word


def _join_names(names) -> str:
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]


def _ordinal(k: int) -> str:
  suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
  return f"{k}{suffix}"


def _split_template(template: str, **kw) -> tuple[str, str]:
  """(text before {context}, text after it), formatted with `kw`."""
  head, tail = template.split("{context}")
  return head.format(**kw), tail.format(**kw)


def _insert_lines(units: list[str], items: list[str], depths) -> str:
  """`units` joined by newlines with each item its own line at fraction `depths[i]`."""
  slots = [round(float(d) * len(units)) for d in depths]
  order = sorted(range(len(items)), key=lambda i: slots[i])  # stable: ties keep item order
  lines, prev = [], 0
  for i in order:
    lines += units[prev : slots[i]]
    lines.append(items[i])
    prev = slots[i]
  lines += units[prev:]
  return "\n".join(lines)


def _insert_code(text: str, items: list[str], depths) -> str:
  """Each item as a line of its own at the first line start at or after fraction depth."""
  cuts = []
  for d in depths:
    p = int(float(d) * len(text))
    cuts.append(0 if p == 0 else (text.find("\n", p - 1) + 1 or len(text)))
  order = sorted(range(len(items)), key=lambda i: cuts[i])
  out, prev = [], 0
  for i in order:
    out.append(text[prev : cuts[i]])
    at_line_start = cuts[i] == 0 or text[cuts[i] - 1] == "\n"
    out.append(items[i] + "\n" if at_line_start else "\n" + items[i])
    prev = cuts[i]
  out.append(text[prev:])
  return "".join(out)


def _haystack(rng, source: Source, kind: str, avail: int, items, depths, make_unit=None):
  """A haystack of `kind` holding `items` at `depths` in about `avail` tokens.

  Returns (render, n, step): `render(n)` is the text with n filler units (lines, or corpus
  tokens for "code"); `n` fills `avail` when token counts add up (the byte tokenizer);
  `step(over)` is how many units to drop when a render overshoots by `over` tokens.
  """
  avail -= sum(source.count(it + "\n") for it in items)
  if kind == "code":
    seed = _seed(rng)
    return (lambda n: _insert_code(source.code(seed, n), items, depths)), avail, lambda o: o
  if kind == "noise":
    units = [NOISE] * max(0, avail // source.count(NOISE + "\n"))
  else:  # units drawn one by one until the budget is spent
    units, used = [], 0
    while True:
      unit = make_unit()
      used += source.count(unit + "\n")
      if used > avail:
        break
      units.append(unit)
  return (lambda n: _insert_lines(units[:n], items, depths)), len(units), lambda over: 1


def _fit(build: Callable[[int], tuple], n: int, budget: int, count, step, what: str):
  """build(n) for the largest n <= the guess whose prompt (build(n)[0]) fits `budget`."""
  while n >= 0:
    out = build(n)
    over = count(out[0]) - budget
    if over <= 0:
      return out
    n -= max(1, step(over))
  raise ValueError(f"{what}: the target length is too short for the task's fixed text")


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int:
  """The largest n in [lo, hi] with fits(n) (fits is monotone), or lo - 1."""
  while lo <= hi:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid + 1
    else:
      hi = mid - 1
  return hi


def _check_once(text: str, strings) -> bool:
  return all(text.count(s) == 1 for s in strings)


def _retry(make, attempts: int = 8):
  """Redraws until `make()` returns a sample (not None): values colliding with the filler."""
  for _ in range(attempts):
    sample = make()
    if sample is not None:
      return sample
  raise RuntimeError("could not draw answers that occur exactly once in the haystack")


# ------------------------------------------------------------------------- generators


def niah(
  rng,
  source: Source,
  length: int,
  *,
  haystack: str = "code",
  key_type: str = "words",
  value_type: str = "numbers",
  num_keys: int = 1,
  num_values: int = 1,
  num_queries: int = 1,
  depth: float | None = None,
  max_new_tokens: int = 128,
) -> TaskSample:
  """RULER needle-in-a-haystack: needles "One of the special magic numbers for K is: V."

  haystack: "noise" (RULER's repeated sentence), "needle" (distractor needles with other
  keys) or "code" (corpus text, RULER's "essay"). `num_keys - num_queries` keys are
  distractors; `depth` in [0, 1] places the first answer's needle, the others go to
  distinct random points of RULER's 40-point depth grid.
  """
  if haystack not in ("noise", "needle", "code"):
    raise ValueError(f"haystack={haystack!r} is not one of ('noise', 'needle', 'code')")
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  num_keys = max(num_keys, num_queries)
  type_v = value_type
  template = NIAH_TEMPLATE
  if num_queries * num_values == 1:  # RULER's singular wording
    template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
    type_v = type_v[:-1]

  def make():
    keys = _random(rng, key_type, num_keys)
    if len(set(keys)) < num_keys:
      return None
    values = [_random(rng, value_type, num_values) for _ in keys]
    needles = [
      (i, NEEDLE.format(type_v=value_type, key=k, value=v))
      for i, (k, vs) in enumerate(zip(keys, values, strict=True))
      for v in vs
    ]
    needles = [needles[j] for j in rng.permutation(len(needles))]  # RULER shuffles them
    asked = [int(i) for i in rng.choice(num_keys, num_queries, replace=False)]
    answers = [v for i in asked for v in values[i]]
    grid = rng.choice(len(DEPTHS), len(needles), replace=False)
    depths = [DEPTHS[g] / 100 for g in grid]
    if depth is not None:
      first = next(j for j, (i, n) in enumerate(needles) if answers[0] in n)
      depths[first] = float(depth)
    head, tail = _split_template(
      template, type_v=type_v, query=_join_names([keys[i] for i in asked])
    )
    budget = length - max_new_tokens
    avail = budget - source.count(head) - source.count(tail)
    if haystack == "needle":
      filler_keys = iter(())

      def make_unit():
        nonlocal filler_keys
        key = next(filler_keys, None)
        if key is None:  # draw distractor keys in batches
          filler_keys = iter(_random(rng, key_type, 256, exclude=keys, replace=True))
          key = next(filler_keys)
        value = _random(rng, value_type, 1)[0]
        return NEEDLE.format(type_v=value_type, key=key, value=value)

    else:
      make_unit = None
    items = [n for _, n in needles]
    render, n, step = _haystack(rng, source, haystack, avail, items, depths, make_unit)
    body = _fit(lambda n: (head + render(n) + tail,), n, budget, source.count, step, "niah")
    prompt = body[0]
    if not _check_once(prompt, answers):
      return None
    context = prompt[: len(prompt) - len(tail)]
    hay = context[len(head) :]
    meta = {
      "filler": haystack,
      "filler_source": _filler_source(source, haystack),
      "depth": None if depth is None else float(depth),
      "needle_depths": [round(hay.index(n) / max(1, len(hay)), 4) for n in items],
      "needle_is_answer": [i in asked for i, _ in needles],
      "keys": [keys[i] for i in asked],
      "prompt_tokens": source.count(prompt),
    }
    target = " " + _join_names(answers) + "."
    return TaskSample("niah", context, tail, tuple(answers), target, "all", max_new_tokens, meta)

  return _retry(make)


def _filler_source(source: Source, kind: str) -> str:
  if kind == "code":
    return f"corpus:{source.root or 'stdlib'}:{source.split}"
  return {"noise": "ruler-noise-sentence", "needle": "distractor-needles"}.get(kind, kind)


def variable_tracking(
  rng,
  source: Source,
  length: int,
  *,
  num_chains: int = 1,
  num_hops: int = 4,
  haystack: str = "noise",
  max_new_tokens: int = 64,
) -> TaskSample:
  """RULER vt: chains "VAR A = 12345", "VAR B = VAR A", ... hidden in noise (or code);
  the answer is every variable of the first chain (num_hops + 1 names)."""
  if haystack not in ("noise", "code"):
    raise ValueError(f"haystack={haystack!r} is not one of ('noise', 'code')")
  letters = list(string.ascii_uppercase)

  def make():
    names = set()
    while len(names) < num_chains * (num_hops + 1):
      names.add("".join(rng.choice(letters, 5)))
    names = [str(x) for x in rng.permutation(sorted(names))]
    values = [str(x) for x in rng.choice(np.arange(10000, 100000), num_chains, replace=False)]
    chains, items, depths = [], [], []
    for c in range(num_chains):
      vars_c = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
      chain = [f"VAR {vars_c[0]} = {values[c]}"]
      chain += [f"VAR {vars_c[j + 1]} = VAR {vars_c[j]}" for j in range(num_hops)]
      chains.append(vars_c)
      items += chain
      depths += sorted(rng.random(len(chain)).tolist())  # hops in order, anywhere
    head, tail = _split_template(VT_TEMPLATE, query=values[0], num_v=num_hops + 1)
    budget = length - max_new_tokens
    avail = budget - source.count(head) - source.count(tail)
    render, n, step = _haystack(rng, source, haystack, avail, items, depths)
    prompt = _fit(lambda n: (head + render(n) + tail,), n, budget, source.count, step, "vt")[0]
    context = prompt[: len(prompt) - len(tail)]
    if not _check_once(context, values):
      return None
    meta = {
      "filler": haystack,
      "filler_source": _filler_source(source, haystack),
      "num_chains": num_chains,
      "num_hops": num_hops,
      "initial_value": values[0],
      "chains": chains,
      "prompt_tokens": source.count(prompt),
    }
    answers = tuple(chains[0])
    target = " " + " ".join(answers)
    return TaskSample("vt", context, tail, answers, target, "all", max_new_tokens, meta)

  return _retry(make)


def common_words(
  rng,
  source: Source,
  length: int,
  *,
  freq_cw: int = 30,
  freq_ucw: int = 3,
  num_cw: int = 10,
  max_new_tokens: int = 192,
) -> TaskSample:
  """RULER cwe: a numbered list where `num_cw` words appear `freq_cw` times and the rest
  `freq_ucw` times, after one solved example; below 4096 tokens RULER uses 6 and 1 (and
  a 20-word example). A byte is about a quarter of a BPE token, so for the byte tokenizer
  that switch sits at 4 x 4096 bytes. The answer is the common words."""
  words = source.words
  small = length < 4096 * (4 if isinstance(source.tokenizer, ByteTokenizer) else 1)
  ex_words, ex_cw, ex_ucw = (20, 3, 1) if small else (40, 10, 3)
  if small:
    freq_cw, freq_ucw = 6, 1
  perm = rng.permutation(len(words))
  ex = [words[i] for i in perm[:ex_words]]
  pool = [words[i] for i in perm[ex_words:]]
  sub = _seed(rng)

  def numbered(ws):
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))

  def listing(ws, fc, fu, seed):
    seq = ws[:num_cw] * fc + ws[num_cw:] * fu
    return numbered([seq[i] for i in np.random.default_rng(seed).permutation(len(seq))])

  shot = CWE_TEMPLATE.format(context=listing(ex, ex_cw, ex_ucw, sub), num_cw=num_cw)
  shot += " " + numbered(ex[:num_cw]) + "\n"
  head, tail = _split_template(CWE_TEMPLATE, num_cw=num_cw)
  budget = length - max_new_tokens

  def build(n):
    return shot + head + listing(pool[:n], freq_cw, freq_ucw, [sub, n]) + tail

  n = _largest(lambda n: source.count(build(n)) <= budget, num_cw + 1, len(pool))
  if n < num_cw + 1:
    raise ValueError(f"cwe: length={length} is too short for {num_cw} common words")
  prompt = build(n)
  if n == len(pool) and source.count(prompt) < 0.95 * budget:
    raise ValueError(f"cwe: {len(words)} corpus words are too few for length={length}")
  meta = {
    "filler": "words",
    "filler_source": f"corpus-words:{len(words)}",
    "num_words": n,
    "freq_cw": freq_cw,
    "freq_ucw": freq_ucw,
    "prompt_tokens": source.count(prompt),
  }
  answers = tuple(pool[:num_cw])
  target = " " + numbered(answers)
  return TaskSample(
    "cwe", prompt[: len(prompt) - len(tail)], tail, answers, target, "all", max_new_tokens, meta
  )


def freq_words(
  rng,
  source: Source,
  length: int,
  *,
  alpha: float = 2.0,
  coded_wordlen: int = 6,
  vocab_size: int | None = None,
  max_new_tokens: int = 64,
) -> TaskSample:
  """RULER fwe: random 6-letter words with Zipf(alpha) counts (rank 1 is the noise "...");
  the answer is the words of ranks 2-4."""
  budget = length - max_new_tokens
  vocab_size = vocab_size or max(8, budget // 50)  # RULER: max_seq_length // 50
  vocab = set()
  while len(vocab) < vocab_size:
    vocab.add("".join(rng.choice(list(string.ascii_lowercase), coded_wordlen)))
  vocab = [str(w) for w in rng.permutation(sorted(vocab))]
  vocab[0] = "..."
  sub = _seed(rng)
  head, tail = _split_template(FWE_TEMPLATE)
  ranks = np.arange(1, vocab_size + 1)

  def counts(n):
    return (n * ranks**-alpha / zeta(alpha)).astype(np.int64)

  def build(n):
    seq = np.repeat(np.arange(vocab_size), counts(n))
    seq = seq[np.random.default_rng([sub, n]).permutation(len(seq))]
    return head + " ".join(vocab[i] for i in seq) + tail

  n = _largest(lambda n: source.count(build(n)) <= budget, 1, budget)
  c = counts(n)
  if n < 1 or not c[1] > c[2] > c[3] > c[4]:
    raise ValueError(f"fwe: length={length} is too short to rank three words by count")
  prompt = build(n)
  meta = {
    "filler": "coded-words",
    "filler_source": "random",
    "num_words": int(n),
    "vocab_size": vocab_size,
    "alpha": alpha,
    "counts": c[:5].tolist(),
    "prompt_tokens": source.count(prompt),
  }
  answers = tuple(vocab[1:4])
  return TaskSample(
    "fwe",
    prompt[: len(prompt) - len(tail)],
    tail,
    answers,
    " " + " ".join(answers),
    "all",
    max_new_tokens,
    meta,
  )


def _numbered_docs(docs) -> str:
  return "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))


def _qa(source, length, gold, make_unit, depths, question, answer, max_new_tokens, what):
  """Gold documents at `depths` among distractor documents, in RULER's QA prompt."""
  head, tail = _split_template(QA_TEMPLATE, query=question)
  budget = length - max_new_tokens
  avail = budget - source.count(head) - source.count(tail)
  avail -= sum(source.count(f"Document {i + 1}:\n{g}\n\n") for i, g in enumerate(gold))
  units, used = [], 0
  while True:
    u = make_unit()
    used += source.count(f"Document {len(units) + len(gold) + 1}:\n{u}\n\n")
    if used > avail:
      break
    units.append(u)

  def build(n):
    slots = [round(d * n) for d in depths]
    docs, prev = [], 0
    for i in sorted(range(len(gold)), key=lambda i: slots[i]):
      docs += units[prev : slots[i]] + [gold[i]]
      prev = slots[i]
    docs += units[prev:n]
    return (head + _numbered_docs(docs) + tail, docs)

  prompt, docs = _fit(build, len(units), budget, source.count, lambda over: 1, what)
  if prompt.count(answer) != 1:
    return None
  meta = {
    "filler": "templated-documents",
    "filler_source": "pseudo-words",
    "num_docs": len(docs),
    "gold_docs": [docs.index(g) + 1 for g in gold],
    "depths": [float(d) for d in depths],
    "prompt_tokens": source.count(prompt),
  }
  return TaskSample(
    what, prompt[: len(prompt) - len(tail)], tail, (answer,), " " + answer, "part",
    max_new_tokens, meta,
  )  # fmt: skip


def qa_single(rng, source, length, *, depth=None, max_new_tokens=32) -> TaskSample:
  """SQuAD stand-in: one entity-attribute document answers; distractors share the template
  (and one the entity's first name)."""
  questions = (
    ("In which city was {e} born?", "city"),
    ("At which institute did {e} study?", "school"),
    ("What is the title of the book that {e} published?", "title"),
    ("Which prize did the book by {e} win?", "prize"),
  )

  def doc(used, first=None):
    f, last, city, school, title, prize = _pseudo_words(rng, 6, used)
    person = {"e": f"{first or f} {last}", "city": city, "school": school}
    person |= {"title": title, "prize": prize, "job": _a(str(rng.choice(PROFESSIONS)))}
    person["year"] = int(rng.integers(1850, 2000))
    text = (
      "{e} is {job} born in the city of {city} in {year}. After studying at the {school} "
      "Institute, {e} published a book titled {title}, which won the {prize} Prize."
    ).format(**person)
    return person, text

  def make():
    used = set()
    person, gold = doc(used)
    q, attr = questions[int(rng.integers(len(questions)))]
    first = person["e"].split()[0]
    near = [True]  # the first distractor shares the first name

    def make_unit():
      share = near.pop() if near else False
      return doc(used, first if share else None)[1]

    d = float(rng.random()) if depth is None else float(depth)
    sample = _qa(
      source, length, [gold], make_unit, [d], q.format(e=person["e"]), person[attr],
      max_new_tokens, "qa_1",
    )  # fmt: skip
    if sample is not None:
      sample.meta["entity"] = person["e"]
    return sample

  return _retry(make)


def qa_two_hop(rng, source, length, *, depth=None, max_new_tokens=32) -> TaskSample:
  """HotpotQA stand-in: "P works for C" and "C is headquartered in X" are two documents;
  the question names P and asks for X. Distractors are other people and companies."""

  def person_doc(used, company):
    p = " ".join(_pseudo_words(rng, 2, used))
    pet = _pseudo_words(rng, 1, used)[0]
    job, year = str(rng.choice(PROFESSIONS)), int(rng.integers(1990, 2024))
    return p, (
      f"{p} is {_a(job)}. {p} has worked for {company} since {year} and keeps a cat named {pet}."
    )

  def company_doc(used, company):
    city, product = _pseudo_words(rng, 2, used)
    industry, year = str(rng.choice(INDUSTRIES)), int(rng.integers(1850, 2020))
    return city, (
      f"{company} is {_a(industry)} company founded in {year}. The headquarters of {company} "
      f"are in the city of {city}, and its best-selling product is the {product}."
    )

  def make():
    used = set()
    company = _pseudo_words(rng, 1, used)[0]
    person, doc_a = person_doc(used, company)
    city, doc_b = company_doc(used, company)
    flip, others = [bool(rng.integers(2))], []

    def make_unit():
      # Alternate people and companies; distractor people work for distractor companies,
      # so every person starts a complete two-hop chain.
      flip[0] = not flip[0]
      if flip[0] and others:
        return person_doc(used, others[int(rng.integers(len(others)))])[1]
      others.append(_pseudo_words(rng, 1, used)[0])
      return company_doc(used, others[-1])[1]

    d = [float(rng.random()) if depth is None else float(depth), float(rng.random())]
    q = f"In which city are the headquarters of the company that {person} works for?"
    sample = _qa(source, length, [doc_a, doc_b], make_unit, d, q, city, max_new_tokens, "qa_2")
    if sample is not None:
      sample.meta["bridge"] = company
    return sample

  return _retry(make)


def _response(rng, topic: str) -> str:
  """A templated response: a title and four to six random sentences."""

  def pick(words):
    return str(rng.choice(words))

  title = f"{pick(ADJECTIVES).capitalize()} {topic.capitalize()}"
  lines = [title]
  for _ in range(int(rng.integers(4, 7))):
    lines.append(
      f"The {pick(ADJECTIVES)} {pick(NOUNS)} {pick(VERBS)} {pick(PREPOSITIONS)} the "
      f"{pick(ADJECTIVES)} {pick(NOUNS + (topic,))}."
    )
  return "\n".join(lines)


def mrcr(
  rng,
  source: Source,
  length: int,
  *,
  num_needles: int = 4,
  k: int | None = None,
  max_new_tokens: int | None = None,
) -> TaskSample:
  """OpenAI MRCR-style: `num_needles` identical requests ("Write a poem about tapirs.") in
  a stream of other requests; the query asks for the k-th response with a random prefix."""
  if num_needles < 1:
    raise ValueError(f"num_needles={num_needles} must be >= 1")
  k = int(rng.integers(1, num_needles + 1)) if k is None else k
  if not 1 <= k <= num_needles:
    raise ValueError(f"k={k} must be in [1, num_needles={num_needles}]")
  form = str(rng.choice(MRCR_FORMS))
  topic = str(rng.choice(MRCR_TOPICS))

  def turn(f, t, response):
    return f"User: Write a {f} about {t}.\nAssistant: {response}\n\n"

  def make():
    responses = [_response(rng, topic) for _ in range(num_needles)]
    if len(set(responses)) < num_needles:
      return None
    alphabet = list(string.ascii_letters + string.digits)
    prefix = "".join(rng.choice(alphabet, 10))
    target = prefix + responses[k - 1]
    budget_new = max_new_tokens or source.count(target) + 16
    query = MRCR_QUERY.format(prefix=prefix, ordinal=_ordinal(k), form=form, topic=topic)
    budget = length - budget_new
    needles = [turn(form, topic, r) for r in responses]
    avail = budget - source.count(query) - sum(source.count(n) for n in needles)
    depths = sorted(rng.random(num_needles).tolist())
    units, used = [], 0
    while True:
      # Distractors: another form, another topic, or both, never the needle's pair.
      f, t = form, topic
      while (f, t) == (form, topic):
        f = str(rng.choice(MRCR_FORMS)) if rng.random() < 0.7 else form
        t = str(rng.choice(MRCR_TOPICS)) if rng.random() < 0.7 else topic
      u = turn(f, t, _response(rng, t))
      used += source.count(u)
      if used > avail:
        break
      units.append(u)

    def build(n):
      slots = [round(d * n) for d in depths]
      out, prev = [], 0
      for s, needle in zip(slots, needles, strict=True):  # depths are sorted
        out += units[prev:s] + [needle]
        prev = s
      return ("".join(out + units[prev:n]) + query,)

    prompt = _fit(build, len(units), budget, source.count, lambda over: 1, "mrcr")[0]
    context = prompt[: len(prompt) - len(query)]
    if context.count(responses[k - 1]) != 1 or prefix in context:
      return None
    meta = {
      "filler": "templated-turns",
      "filler_source": "word-lists",
      "prefix": prefix,
      "k": k,
      "num_needles": num_needles,
      "form": form,
      "topic": topic,
      "needle_depths": [round(context.index(n) / len(context), 4) for n in needles],
      "prompt_tokens": source.count(prompt),
    }
    return TaskSample("mrcr", context, query, (target,), target, "mrcr", budget_new, meta)

  return _retry(make)


def mqar(
  rng,
  source: Source,
  length: int,
  *,
  cfg: tasks.MQARConfig | None = None,
  filler: str = "noise",
) -> TaskSample:
  """Zoology's multi-query associative recall with uniform gaps, as text.

  "mqar k1:v1 ... kN:vN |" then `length` tokens of filler ("noise" or "code") holding the
  queries "\\nk:v\\n" at offsets drawn uniformly without replacement. Teacher-forced only:
  `spans` mark each queried value; meta["distances"] is, per query in order, the tokens
  from the key's pair to its query (for accuracy bucketed by distance).
  """
  cfg = cfg or tasks.MQARConfig()
  if filler not in ("noise", "code"):
    raise ValueError(f"filler={filler!r} is not one of ('noise', 'code')")
  if 10**cfg.value_len < cfg.num_pairs:
    raise ValueError(f"mqar: {cfg.num_pairs} distinct values need value_len > {cfg.value_len}")
  count = source.count
  q_len = count(f"\n{'a' * cfg.key_len}:{'0' * cfg.value_len}\n")
  pair = "a" * cfg.key_len + ":" + "0" * cfg.value_len
  pairs_len = count("mqar " + " ".join([pair] * cfg.num_pairs) + " |")
  free = length - pairs_len - cfg.num_queries * q_len
  if free < 0:
    raise ValueError(f"mqar: length={length} is too short for {cfg.num_pairs} pairs")
  if filler == "code":
    fill = source.code(_seed(rng), free)
  else:
    fill = (NOISE + " ") * (free // (len(NOISE) + 1) + 1)
    fill = fill[:free]
  # Keys that occur as "k:" in the filler would make a second binding: never use them.
  taken = set(re.findall(rf"(?=([a-z]{{{cfg.key_len}}}):)", fill))
  keys = []
  while len(keys) < cfg.num_pairs:
    key = "".join(rng.choice(list(string.ascii_lowercase), cfg.key_len))
    if key not in taken and key not in keys:
      keys.append(key)
  values = [
    str(v).zfill(cfg.value_len) for v in rng.choice(10**cfg.value_len, cfg.num_pairs, False)
  ]
  asked = [int(i) for i in rng.permutation(cfg.num_pairs)[: cfg.num_queries]]
  offsets = np.sort(rng.choice(len(fill) + 1, cfg.num_queries, replace=False))

  pairs = [f"{k}:{v}" for k, v in zip(keys, values, strict=True)]
  key_at, tok = {}, count("mqar ")
  for key, pair in zip(keys, pairs, strict=True):
    key_at[key] = tok
    tok += count(pair + " ")
  head = "mqar " + " ".join(pairs) + " |"
  pieces, spans, starts, distances = [head], [], [], []
  tok, char, prev = count(head), len(head), 0
  for off, i in zip(offsets.tolist(), asked, strict=True):
    gap = fill[prev:off]
    tok, char = tok + count(gap), char + len(gap)
    starts.append(tok + 1)  # the key, after the newline
    distances.append(starts[-1] - key_at[keys[i]])
    ask = f"\n{keys[i]}:"
    spans.append((char + len(ask), char + len(ask) + len(values[i])))
    line = ask + values[i] + "\n"
    pieces += [gap, line]
    tok, char, prev = tok + count(line), char + len(line), off
  pieces.append(fill[prev:])
  text = "".join(pieces)
  meta = {
    "filler": filler,
    "filler_source": _filler_source(source, "code" if filler == "code" else "noise"),
    "num_pairs": cfg.num_pairs,
    "keys": [keys[i] for i in asked],
    "distances": distances,
    "query_positions": starts,
    "prompt_tokens": count(text),
  }
  answers = tuple(values[i] for i in asked)
  return TaskSample("mqar", text, "", answers, "", "exact", 0, meta, tuple(spans))


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., TaskSample]] = {
  "niah_single_1": functools.partial(niah, haystack="noise"),
  "niah_single_2": functools.partial(niah, haystack="code"),
  "niah_single_3": functools.partial(niah, haystack="code", value_type="uuids"),
  "niah_multikey_1": functools.partial(niah, haystack="code", num_keys=4),
  "niah_multikey_2": functools.partial(niah, haystack="needle"),
  "niah_multikey_3": functools.partial(
    niah, haystack="needle", key_type="uuids", value_type="uuids"
  ),
  "niah_multivalue": functools.partial(niah, haystack="code", num_values=4),
  "niah_multiquery": functools.partial(niah, haystack="code", num_queries=4),
  "vt": variable_tracking,
  "cwe": common_words,
  "fwe": freq_words,
  "qa_1": qa_single,
  "qa_2": qa_two_hop,
  # The needle: UUID key -> UUID value in real text, and the same in noise.
  "niah_uuid": functools.partial(niah, haystack="code", key_type="uuids", value_type="uuids"),
  "niah_uuid_noise": functools.partial(
    niah, haystack="noise", key_type="uuids", value_type="uuids"
  ),
  "mrcr": mrcr,
  "mrcr_2": functools.partial(mrcr, num_needles=2),
  "mrcr_8": functools.partial(mrcr, num_needles=8),
  "mqar": mqar,
  "mqar_code": functools.partial(mqar, filler="code"),
}

RULER = (
  "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
  "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)  # fmt: skip
SUITES = {
  "ruler": RULER,
  "niah": tuple(n for n in TASKS if n.startswith("niah")),
  "mrcr": ("mrcr_2", "mrcr", "mrcr_8"),
  "mqar": ("mqar", "mqar_code"),
}
# Tasks whose generator takes `depth` (for depth x length heatmaps).
TAKES_DEPTH = frozenset(n for n in TASKS if n.startswith(("niah", "qa")))


def suite(name: str) -> tuple[str, ...]:
  """Task names of a suite ("ruler", "niah", "mrcr", "mqar") or of one task."""
  if name in SUITES:
    return SUITES[name]
  if name in TASKS:
    return (name,)
  raise ValueError(f"suite {name!r} is not one of {sorted(SUITES)} nor a task name")


def generate(
  name: str,
  length: int,
  *,
  seed=0,
  source: Source | None = None,
  depth: float | None = None,
  **knobs,
) -> TaskSample:
  """One sample of task `name`; the same (name, length, seed, depth, source) gives the
  same sample. `seed` may be an int or a sequence of ints (e.g. [seed, index])."""
  if name not in TASKS:
    raise ValueError(f"task {name!r} is not one of {sorted(TASKS)}")
  if depth is not None:
    if name not in TAKES_DEPTH:
      raise ValueError(f"task {name!r} does not take a depth")
    knobs["depth"] = depth
  rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), zlib.crc32(name.encode())])
  sample = TASKS[name](rng, source or default_source(), length, **knobs)
  return dataclasses.replace(sample, task=name)
