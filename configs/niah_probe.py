"""NIAH at quickstart scale on CPU: can a key-length curriculum teach multi-character needles?

  python -m experiments.train --config=configs/niah_probe.py:ladder=2-4 --workdir=runs/np

The quickstart model and optimizer (configs/quickstart.py) on 90% needle-in-a-haystack, 10%
code, 256 tokens: `needles` needles (default 4) `# key {key}={value}` of `chars` hex
digits, each queried once as `# recall {key}=` (the key's last digits sit right before
the value in both, so the short convolution links them as in MQAR). Variants: `kind=`
(the mechanism), `chars=` (the final key and value length), `steps=` (steps at that
length), `ladder=2-4` (first train `ladder_steps` steps at each of these lengths),
`needles=`, `format=eq|adjacent` (below), `alphabet=greek` (keys of Greek letters, never
in the code), `value_alphabet=digits` (decimal values), `together` (the needles one after
another at one depth, as MQAR's pairs), `together_steps=` (first train that many steps with
the needles together, then `steps` as configured), `smoke`. Evaluated at 1x, 4x, 16x.
Results: experiments/results/niah_probe_cpu/.
"""

from configs import quickstart
from subq_jax.experiment import parse_arg

# needle, query: `eq` puts '=' between key and value; `adjacent` is MQAR's layout (the
# value right after the key, no words around the query's key).
FORMATS = {
  "eq": ("\n# key {key}={value}\n", "\n# recall {key}="),
  "adjacent": ("\n# {key}{value}\n", "\n# {key}"),
}


def get_config(arg=None):
  arg = parse_arg(
    arg,
    kind="ssa",
    chars=6,
    steps=700,
    ladder="",
    ladder_steps=400,
    needles=4,
    format="eq",
    alphabet="uuid",
    value_alphabet="uuid",
    together=False,
    together_steps=0,
    smoke=False,
  )
  c = quickstart.get_config(f"kind={arg.kind}" + (",smoke" if arg.smoke else ""))
  c.data.mixture = {"code": 0.1, "niah": 0.9}
  c.data.niah.update(num_needles=arg.needles, num_queries=arg.needles, uuid_chars=arg.chars)
  c.data.niah.update(key_alphabet=arg.alphabet, value_alphabet=arg.value_alphabet)
  c.data.niah.together = arg.together
  if arg.format not in FORMATS:
    raise ValueError(f"format={arg.format!r} is not one of {tuple(FORMATS)}")
  needle, query = FORMATS[arg.format]
  c.data.niah.update(needle_format=needle, query_format=query)
  seq_len = c.train.stages[0]["seq_len"]
  stages = []
  for chars in filter(None, arg.ladder.split("-")):
    if not 1 <= int(chars) < arg.chars:
      raise ValueError(f"ladder={arg.ladder!r}: {chars} must be in [1, chars={arg.chars})")
    stages.append(
      dict(seq_len=seq_len, steps=arg.ladder_steps, data={"niah": {"uuid_chars": int(chars)}})
    )
  if arg.together_steps:
    stages.append(
      dict(seq_len=seq_len, steps=arg.together_steps, data={"niah": {"together": True}})
    )
  stages.append(dict(seq_len=seq_len, steps=1 if arg.smoke else arg.steps))
  c.train.stages = stages
  c.eval.tasks = ["niah"]
  if arg.smoke:  # 128 tokens hold one needle
    c.data.niah.update(num_needles=1, num_queries=1)
  return c
