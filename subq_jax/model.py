"""Llama-style decoder in Flax NNX with a per-layer attention mechanism.

RMSNorm, SwiGLU, RoPE with YaRN scaling, GQA, tied or untied embeddings. Parameters are
float32, activations `ModelConfig.dtype` (bfloat16 by default). Every attention layer
calls `ssa_attention` with the layer's `SSAConfig`, so a mix such as "dense every 4th
layer" is a pattern of kinds in the config.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from subq_jax import sharding
from subq_jax.config import KINDS, SSAConfig
from subq_jax.ssa import ssa_attention

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder.

  Attributes:
    vocab_size: embedding rows (the tokenizer's vocabulary).
    num_layers, d_model, num_heads, num_kv_heads, mlp_dim: the usual; `num_heads`
      must be a multiple of `num_kv_heads` (GQA).
    head_dim: None means d_model // num_heads.
    tie_embeddings: the output projection is the transposed embedding.
    rope_theta: RoPE base.
    rope_scale: YaRN scale factor s (1.0 = plain RoPE).
    rope_original_length: context length the RoPE frequencies were trained at (YaRN's
      L); only used when rope_scale > 1.
    yarn_beta_fast, yarn_beta_slow: YaRN ramp bounds, in rotations over
      `rope_original_length`: dimensions turning more than beta_fast times keep their
      frequency, fewer than beta_slow times are interpolated by 1/s, linear in between.
    yarn_temperature: scale the attention logits by (0.1 ln s + 1)**2 (YaRN's sqrt(1/t)
      applied to both q and k).
    attention: the mechanism and its knobs (`SSAConfig`).
    attention_pattern: kinds cycled over the layers, e.g. ("ssa", "ssa", "ssa", "dense")
      makes every 4th layer dense; empty means `attention.kind` everywhere.
    dtype: activation dtype; parameters stay float32.
    remat: one of `REMAT_POLICIES` (rematerialisation of each decoder block).
    attention_impl: passed to `ssa_attention(implementation=...)`; None = best.
    norm_eps: RMSNorm epsilon.
    short_conv: width W of a causal depthwise convolution, with a residual, on each
      attention layer's normalised input (x_t + sum_j c_j x_{t-j}, j < W), as the short
      convolutions of H3 / Based and the Canon layers; 0 = off. A key then carries the
      tokens just before it, so one attention layer can do associative recall.
  """

  vocab_size: int = 258
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  mlp_dim: int = 512
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  rope_scale: float = 1.0
  rope_original_length: int = 0
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_temperature: bool = True
  attention: SSAConfig = dataclasses.field(default_factory=SSAConfig)
  attention_pattern: tuple[str, ...] = ()
  dtype: str = "bfloat16"
  remat: str = "none"
  attention_impl: str | None = None
  norm_eps: float = 1e-6
  short_conv: int = 0

  def __post_init__(self):
    if isinstance(self.attention, dict):
      object.__setattr__(self, "attention", SSAConfig(**self.attention))
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name}={value!r} must be an integer >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} must be a multiple of "
        f"model.num_kv_heads={self.num_kv_heads} (GQA)"
      )
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
        "set model.head_dim"
      )
    if self.dim_per_head % 2:
      raise ValueError(f"head_dim={self.dim_per_head} must be even (RoPE rotates pairs)")
    for kind in self.attention_pattern:
      if kind not in KINDS:
        raise ValueError(f"model.attention_pattern has kind={kind!r}, not one of {KINDS}")
    if not isinstance(self.short_conv, int) or self.short_conv < 0:
      raise ValueError(f"model.short_conv={self.short_conv!r} must be an integer >= 0")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
    if self.rope_scale < 1.0:
      raise ValueError(f"model.rope_scale={self.rope_scale} must be >= 1")
    if self.rope_scale > 1.0 and self.rope_original_length < 1:
      raise ValueError(
        f"model.rope_scale={self.rope_scale} needs model.rope_original_length (YaRN's L)"
      )
    if not self.yarn_beta_fast > self.yarn_beta_slow:
      raise ValueError(
        f"model.yarn_beta_fast={self.yarn_beta_fast} must exceed "
        f"model.yarn_beta_slow={self.yarn_beta_slow}"
      )
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  def layer_attention(self, layer: int) -> SSAConfig:
    """The attention config of decoder layer `layer`."""
    if not self.attention_pattern:
      return self.attention
    kind = self.attention_pattern[layer % len(self.attention_pattern)]
    return dataclasses.replace(self.attention, kind=kind)


# ----------------------------------------------------------------------------- RoPE / YaRN


def yarn_inv_freq(
  head_dim: int,
  theta: float,
  scale: float,
  original_length: int,
  beta_fast: float,
  beta_slow: float,
) -> jax.Array:
  """RoPE inverse frequencies [head_dim // 2], YaRN-interpolated when scale > 1.

  YaRN ("NTK-by-parts", Peng et al. 2023, eq. 17-18): dimension i with frequency
  theta_i turns r_i = L theta_i / (2 pi) times over the original context L. With the ramp
  gamma(r) = clip((r - beta_slow) / (beta_fast - beta_slow), 0, 1), the new frequency is
  (1 - gamma) theta_i / s + gamma theta_i: fast dimensions (local order) are kept, slow
  ones interpolated by 1/s.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scale <= 1.0:
    return inv_freq
  rotations = original_length * inv_freq / (2 * math.pi)
  ramp = jnp.clip((rotations - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)
  return (1.0 - ramp) * inv_freq / scale + ramp * inv_freq


def yarn_mscale(scale: float) -> float:
  """YaRN's sqrt(1/t) = 0.1 ln(s) + 1, applied to both q and k (1 when s <= 1)."""
  return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates the two halves of the head dimension (Llama / NeoX convention)."""
  angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


# ----------------------------------------------------------------------------- attention


def attend(q, k, v, config: SSAConfig, **kwargs):
  """The model's single entry into the attention mechanisms (`ssa_attention`)."""
  return ssa_attention(q, k, v, config, **kwargs)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), **_logical("norm"))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * scale).astype(self.dtype)


def _logical(*axes):
  """Variable metadata naming a parameter's logical axes (`subq_jax.sharding` rules map
  them onto a mesh). Not applied at creation: the model is built without a mesh."""
  return {"out_sharding": axes, "eager_sharding": False}


def _dense(din, dout, cfg: ModelConfig, rngs, std=None, axes=("embed", None)):
  init = nnx.initializers.normal(std if std is not None else 1.0 / math.sqrt(din))
  return nnx.Linear(
    din,
    dout,
    use_bias=False,
    dtype=cfg.dtype,
    kernel_init=init,
    kernel_metadata=_logical(*axes),
    rngs=rngs,
  )


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_cfg = cfg.layer_attention(layer)
    hd = cfg.dim_per_head
    out_std = 1.0 / math.sqrt(cfg.num_heads * hd * 2 * cfg.num_layers)
    q_axes, kv_axes = ("embed", "q_proj"), ("embed", "kv_proj")
    self.wq = _dense(cfg.d_model, cfg.num_heads * hd, cfg, rngs, axes=q_axes)
    self.wk = _dense(cfg.d_model, cfg.num_kv_heads * hd, cfg, rngs, axes=kv_axes)
    self.wv = _dense(cfg.d_model, cfg.num_kv_heads * hd, cfg, rngs, axes=kv_axes)
    self.wo = _dense(cfg.num_heads * hd, cfg.d_model, cfg, rngs, std=out_std, axes=q_axes[::-1])
    if self.attn_cfg.kind == "indexer":
      a = self.attn_cfg
      self.idx_q = _dense(cfg.d_model, a.indexer_heads * a.indexer_dim, cfg, rngs)
      self.idx_k = _dense(cfg.d_model, a.indexer_dim, cfg, rngs)
      self.idx_w = _dense(cfg.d_model, a.indexer_heads, cfg, rngs)
    if cfg.short_conv:
      init = nnx.initializers.normal(1.0 / cfg.short_conv)
      self.conv = nnx.Param(
        init(rngs.params(), (cfg.short_conv, cfg.d_model)), **_logical(None, "embed")
      )

  def short_conv(self, x_BxTxD, history_BxWxD=None):
    """x + causal depthwise convolution of x (identity when `short_conv` is 0).

    `history_BxWxD` holds the W - 1 inputs before x's first position (zeros at the
    sequence start; the decoder passes its cache).
    """
    w = self.cfg.short_conv
    if not w:
      return x_BxTxD
    b, t, d = x_BxTxD.shape
    if history_BxWxD is None:
      history_BxWxD = jnp.zeros((b, w - 1, d), x_BxTxD.dtype)
    padded = jnp.concatenate([history_BxWxD.astype(x_BxTxD.dtype), x_BxTxD], axis=1)
    c = self.conv[...].astype(x_BxTxD.dtype)
    # c[j] weighs the input j positions back.
    mixed = sum(c[j] * padded[:, w - 1 - j : w - 1 - j + t] for j in range(w))
    return x_BxTxD + mixed

  def project(self, x_BxTxD, positions_BxT, inv_freq, history_BxWxD=None):
    """(q, k, v) with RoPE applied and the routing inputs (`ssa_attention` kwargs).

    Shared by the full forward and the KV-cache decoder (`subq_jax.decode`), which passes
    the short convolution's `history_BxWxD` (see `short_conv`).
    """
    cfg, a = self.cfg, self.attn_cfg
    x_BxTxD = self.short_conv(x_BxTxD, history_BxWxD)
    b, t, _ = x_BxTxD.shape
    hd = cfg.dim_per_head
    q = self.wq(x_BxTxD).reshape(b, t, cfg.num_heads, hd)
    k = self.wk(x_BxTxD).reshape(b, t, cfg.num_kv_heads, hd)
    v = self.wv(x_BxTxD).reshape(b, t, cfg.num_kv_heads, hd)
    kwargs = {}
    if a.kind == "indexer":
      # Position-free lightning-indexer heads. The selection is discrete, so they learn
      # only from AttentionInfo.indexer_loss; as in DeepSeek-V3.2 their input is detached,
      # so that loss trains the indexer alone.
      xi = jax.lax.stop_gradient(x_BxTxD)
      kwargs["routing_q"] = self.idx_q(xi).reshape(b, t, a.indexer_heads, a.indexer_dim)
      kwargs["routing_k"] = self.idx_k(xi).reshape(b, t, 1, a.indexer_dim)
      kwargs["indexer_weights"] = self.idx_w(xi)
    elif a.kind != "dense" and not a.route_with_rope:
      kwargs["routing_q"], kwargs["routing_k"] = q, k
    q_axes, kv_axes = (
      ("batch", "seq", "heads", "head_dim"),
      ("batch", "seq", "kv_heads", "head_dim"),
    )
    if a.far_distance:  # far blocks at bounded distances (SSAConfig.far_distance)
      far_pos = jnp.full_like(positions_BxT, a.far_distance + a.block_size - 1)
      kwargs["far_q"] = sharding.constrain(apply_rope(q, far_pos, inv_freq), q_axes)
      far_k = apply_rope(k, positions_BxT % a.block_size, inv_freq)
      kwargs["far_k"] = sharding.constrain(far_k, kv_axes)
    q = sharding.constrain(apply_rope(q, positions_BxT, inv_freq), q_axes)
    k = sharding.constrain(apply_rope(k, positions_BxT, inv_freq), kv_axes)
    v = sharding.constrain(v, kv_axes)
    return q, k, v, kwargs

  def __call__(self, x_BxTxD, positions_BxT, inv_freq, scale, return_info, attention_fn=None):
    cfg, a = self.cfg, self.attn_cfg
    b, t, _ = x_BxTxD.shape
    q, k, v, kwargs = self.project(x_BxTxD, positions_BxT, inv_freq)
    res = (attention_fn or attend)(
      q,
      k,
      v,
      a,
      scale=scale,
      implementation=cfg.attention_impl,
      return_info=return_info,
      **kwargs,
    )
    out, info = res if return_info else (res, None)
    return self.wo(out.reshape(b, t, cfg.num_heads * cfg.dim_per_head)), info


class MLP(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.w1 = _dense(cfg.d_model, cfg.mlp_dim, cfg, rngs, axes=("embed", "mlp"))
    self.w3 = _dense(cfg.d_model, cfg.mlp_dim, cfg, rngs, axes=("embed", "mlp"))
    w2_std = 1.0 / math.sqrt(2 * cfg.mlp_dim * cfg.num_layers)
    self.w2 = _dense(cfg.mlp_dim, cfg.d_model, cfg, rngs, std=w2_std, axes=("mlp", "embed"))

  def __call__(self, x):
    h = jax.nn.silu(self.w1(x)) * self.w3(x)
    return self.w2(sharding.constrain(h, ("batch", "seq", "act_mlp")))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.dtype)
    self.attn = Attention(cfg, layer, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, inv_freq, scale, return_info, attention_fn=None):
    h, info = self.attn(self.attn_norm(x), positions, inv_freq, scale, return_info, attention_fn)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ("batch", "seq", "act_embed")), info


class Transformer(nnx.Module):
  """Decoder-only LM: tokens [batch, seq] -> float32 logits [batch, seq, vocab]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.dtype,
      embedding_init=nnx.initializers.normal(1.0),
      embedding_metadata=_logical("vocab", "embed"),
      rngs=rngs,
    )
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.dtype)
    if not cfg.tie_embeddings:
      self.unembed = _dense(cfg.d_model, cfg.vocab_size, cfg, rngs, axes=("embed", "vocab"))

  def __call__(
    self, tokens_BxT, positions_BxT=None, *, return_info: bool = False, attention_fn=None
  ):
    """Logits (and each layer's AttentionInfo with `return_info`).

    `attention_fn` replaces `attend` in every layer (same signature), e.g.
    `seq_parallel_train.sharded_attend` to run attention with the sequence sharded.
    """
    cfg = self.cfg
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq, scale = self.rope_tables()
    x = sharding.constrain(self.embed(tokens_BxT), ("batch", "seq", "act_embed"))
    infos = []
    policy = REMAT_POLICIES[cfg.remat]
    for block in self.blocks:
      if cfg.remat != "none":
        call = nnx.remat(
          lambda blk, x_, p_: blk(x_, p_, inv_freq, scale, return_info, attention_fn),
          policy=policy,
        )
        x, info = call(block, x, positions_BxT)
      else:
        x, info = block(x, positions_BxT, inv_freq, scale, return_info, attention_fn)
      infos.append(info)
    logits = self.head(x)
    return (logits, infos) if return_info else logits

  def rope_tables(self) -> tuple[jax.Array, float]:
    """(RoPE inverse frequencies, softmax scale with YaRN's temperature) of this config."""
    cfg = self.cfg
    inv_freq = yarn_inv_freq(
      cfg.dim_per_head,
      cfg.rope_theta,
      cfg.rope_scale,
      cfg.rope_original_length,
      cfg.yarn_beta_fast,
      cfg.yarn_beta_slow,
    )
    mscale = yarn_mscale(cfg.rope_scale) if cfg.yarn_temperature else 1.0
    return inv_freq, mscale**2 / math.sqrt(cfg.dim_per_head)

  def head(self, x_BxTxD) -> jax.Array:
    """Final norm and output projection: float32 logits."""
    x = self.final_norm(x_BxTxD)
    if self.cfg.tie_embeddings:
      # Embeddings are N(0, 1); 1/sqrt(d) keeps the initial logits O(1).
      logits = self.embed.attend(x) / math.sqrt(self.cfg.d_model)
    else:
      logits = self.unembed(x)
    return sharding.constrain(logits.astype(jnp.float32), ("batch", "seq", "act_vocab"))


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
