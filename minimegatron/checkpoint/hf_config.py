"""Hugging Face config <-> ModelConfig: what each HF field means here, and what cannot be converted.

=============================  ============================  =====================================
ModelConfig                    GPT2Config                    LlamaConfig
=============================  ============================  =====================================
vocab_size                     vocab_size                    vocab_size
hidden_size                    n_embd                        hidden_size
num_layers                     n_layer                       num_hidden_layers
num_attention_heads            n_head                        num_attention_heads
num_kv_heads                   (= n_head)                    num_key_value_heads
max_seq_len                    n_positions                   max_position_embeddings
ffn_hidden_size                n_inner (None: 4·n_embd)      intermediate_size
norm_eps                       layer_norm_epsilon            rms_norm_eps
gelu_approximate               activation_function           (hidden_act must be silu)
rope_theta                     —                             rope_theta / rope_parameters
rope_scaling                   —                             rope_scaling / rope_parameters
head_dim                       (= n_embd/n_head)             head_dim
attention_bias                 (True)                        attention_bias
tie_embeddings                 tie_word_embeddings           tie_word_embeddings
dropout                        resid_pdrop                   attention_dropout
=============================  ============================  =====================================

``MixtralConfig`` (``MixtralForCausalLM``) is ``LlamaConfig``'s table plus the MoE fields::

    num_experts          num_local_experts           moe_top_k     num_experts_per_tok
    moe_every            1 (every layer is MoE)      moe_capacity_factor   None (no token dropped)
    moe_aux_loss_coeff   k · router_aux_loss_coef if output_router_logits, else 0
    moe_z_loss_coeff     0 (HF Mixtral has no z-loss; a non-zero one is a training-only term, dropped)

HF's aux loss counts f_e as slots/n (Σ f = k), ours as slots/(n·k) (Σ f = 1): for one MoE layer
``HF aux = k · ours``, hence the factor k on the coefficient (``layers/router.py``).

The Llama-3 family's fields (LlamaConfig -> ModelConfig):

* ``head_dim`` -> ``head_dim`` (when it differs from hidden/heads);
* ``attention_bias`` -> ``attention_bias`` (biases on q/k/v_proj and o_proj, as HF puts them);
* ``rope_scaling`` (4.x, beside ``rope_theta``) or ``rope_parameters`` (5.x, holding ``rope_theta``)
  -> ``rope_theta`` and ``rope_scaling``: ``rope_type`` (or 4.x's old ``type``) ``"default"`` is plain
  RoPE, ``"linear"`` and ``"llama3"`` a :class:`~minimegatron.rope_scaling.RopeScaling`;
  ``partial_rotary_factor`` 1.0 is plain RoPE too. The way back writes the spelling of the installed
  transformers major version.

Anything the minimegatron model does not compute (``dynamic``/``yarn``/``longrope`` RoPE, partial
rotary factors < 1, MLP biases in LLaMA, GPT-2's per-layer attention scaling, ...) raises
:class:`UnsupportedHFConfig` naming the field: a converted model that silently computes something
else is worse than no model. ``transformers`` is imported inside the functions only. Works with
transformers 4.45+ and 5.x.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from minimegatron.checkpoint.reshape import CheckpointError
from minimegatron.compat import version_tuple
from minimegatron.config import ModelConfig, gpt_config, llama_config
from minimegatron.rope_scaling import RopeScaling

__all__ = ["UnsupportedHFConfig", "config_from_hf", "config_to_hf", "hf_family"]

# HF GPT-2 names for the tanh GeLU (all the same function) and the exact one
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class UnsupportedHFConfig(CheckpointError):
    """The Hugging Face config asks for something minimegatron's models do not compute."""


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _refuse(field: str, value: Any, why: str) -> None:
    raise UnsupportedHFConfig(f"Hugging Face config field {field}={value!r} is not supported: {why}")


def hf_family(hf_config: Any) -> str:
    """'gpt' for GPT-2, 'llama' for LLaMA; a clear error for any other model_type."""
    model_type = _get(hf_config, "model_type")
    if model_type == "gpt2":
        return "gpt"
    if model_type in ("llama", "mixtral"):
        return model_type
    _refuse("model_type", model_type, "minimegatron converts 'gpt2' (GPT2LMHeadModel), 'llama' "
            "(LlamaForCausalLM) and 'mixtral' (MixtralForCausalLM) checkpoints only")


# Which keys a plain/scaled rope dict may hold (anything else would be silently ignored: refused)
_PLAIN_ROPE = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_ROPE_KEYS = {"default": _PLAIN_ROPE, "linear": _PLAIN_ROPE | {"factor"},
              "llama3": _PLAIN_ROPE | {"factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings"}}


def _rope(cfg: Any) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5's ``rope_parameters`` or 4.x's ``rope_scaling`` +
    ``rope_theta``. Plain RoPE however spelled (None, ``{"rope_type": "default"}``, ``{"type":
    "default"}``, ``partial_rotary_factor: 1.0``); ``linear`` and ``llama3``; anything else refused."""
    field = "rope_parameters" if _get(cfg, "rope_parameters") else "rope_scaling"
    params = dict(_get(cfg, field) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        _refuse(field, params, "RoPE parameters per layer type (nested dicts) are not supported; "
                "one rope dict for every layer is")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        _refuse(field, params, f"rope_type {rope_type!r} is not implemented; supported: 'default' "
                "(plain RoPE), 'linear' and 'llama3' (dynamic, yarn and longrope are not)")
    extra = sorted(set(params) - _ROPE_KEYS[rope_type])
    if extra:
        _refuse(field, params, f"keys {extra} are not part of rope_type {rope_type!r} here")
    partial = params.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        _refuse("partial_rotary_factor", partial, "RoPE here rotates the whole head (1.0); rotating "
                "only part of each head's dims is not implemented")
    theta = float(params.get("rope_theta") or _get(cfg, "rope_theta") or 10000.0)
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    # HF 5 falls back on max_position_embeddings when original_max_position_embeddings is unset
    ctx = params.get("original_max_position_embeddings", _get(cfg, "original_max_position_embeddings")
                     or _get(cfg, "max_position_embeddings"))
    return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), int(ctx))


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """RoPE's LlamaConfig kwargs: 5.x's ``rope_parameters``, or 4.x's ``rope_theta`` + ``rope_scaling``."""
    scaling = ({} if config.rope_scaling is None else
               {k: v for k, v in asdict(config.rope_scaling).items() if v is not None})
    import transformers
    if version_tuple(transformers.__version__) >= (5,):
        return dict(rope_parameters={"rope_type": "default", **scaling, "rope_theta": config.rope_theta})
    return dict(rope_theta=config.rope_theta, rope_scaling=scaling or None)


def _llama_from_hf(cfg: Any) -> ModelConfig:
    if _get(cfg, "hidden_act", "silu") != "silu":
        _refuse("hidden_act", _get(cfg, "hidden_act"), "LLaMA's MLP here is SwiGLU (silu gate)")
    if _get(cfg, "mlp_bias", False):
        _refuse("mlp_bias", True, "minimegatron's LLaMA MLP has no biases; convert a model trained "
                "without them (attention_bias is supported)")
    heads, hidden = _get(cfg, "num_attention_heads"), _get(cfg, "hidden_size")
    head_dim = _get(cfg, "head_dim")
    theta, scaling = _rope(cfg)
    return llama_config(
        vocab_size=_get(cfg, "vocab_size"), hidden_size=hidden, num_layers=_get(cfg, "num_hidden_layers"),
        num_attention_heads=heads, num_kv_heads=_get(cfg, "num_key_value_heads") or heads,
        head_dim=None if head_dim is None or head_dim * heads == hidden else head_dim,
        max_seq_len=_get(cfg, "max_position_embeddings"), ffn_hidden_size=_get(cfg, "intermediate_size"),
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(_get(cfg, "attention_bias", False)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        dropout=float(_get(cfg, "attention_dropout", 0.0) or 0.0), name="llama-from-hf")


def _mixtral_from_hf(cfg: Any) -> ModelConfig:
    if _get(cfg, "sliding_window") is not None:
        _refuse("sliding_window", _get(cfg, "sliding_window"), "attention here is full causal; "
                "sliding-window attention is not implemented (set sliding_window=None)")
    if _get(cfg, "router_jitter_noise", 0.0):
        _refuse("router_jitter_noise", _get(cfg, "router_jitter_noise"), "the router here has no "
                "input jitter; set router_jitter_noise=0")
    k = _get(cfg, "num_experts_per_tok", 2)
    coeff = float(_get(cfg, "router_aux_loss_coef", 0.0)) * k if _get(cfg, "output_router_logits") else 0.0
    return _llama_from_hf(cfg).replace(
        num_experts=_get(cfg, "num_local_experts", 8), moe_top_k=k, moe_every=1,
        moe_capacity_factor=None, moe_aux_loss_coeff=coeff, moe_z_loss_coeff=0.0, name="mixtral-from-hf")


def _gpt_from_hf(cfg: Any) -> ModelConfig:
    act = _get(cfg, "activation_function", "gelu_new")
    if act not in _GELU:
        _refuse("activation_function", act, f"GPT's MLP here uses GeLU; use one of {sorted(_GELU)}")
    if not _get(cfg, "scale_attn_weights", True):
        _refuse("scale_attn_weights", False, "attention scores are always scaled by 1/sqrt(head_dim)")
    if _get(cfg, "scale_attn_by_inverse_layer_idx", False):
        _refuse("scale_attn_by_inverse_layer_idx", True, "scores are not additionally scaled by "
                "1/(layer_idx+1) here")
    if _get(cfg, "add_cross_attention", False):
        _refuse("add_cross_attention", True, "GPTModel is decoder-only, with no cross-attention")
    hidden = _get(cfg, "n_embd")
    return gpt_config(
        vocab_size=_get(cfg, "vocab_size"), hidden_size=hidden, num_layers=_get(cfg, "n_layer"),
        num_attention_heads=_get(cfg, "n_head"), max_seq_len=_get(cfg, "n_positions"),
        ffn_hidden_size=_get(cfg, "n_inner") or 4 * hidden,
        norm_eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)), gelu_approximate=_GELU[act],
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", True)),
        dropout=float(_get(cfg, "resid_pdrop", 0.0) or 0.0), name="gpt2-from-hf")


def config_from_hf(hf_config: Any) -> ModelConfig:
    """ModelConfig of a ``GPT2Config``/``LlamaConfig`` (or its config.json dict); refuses what differs."""
    family = hf_family(hf_config)
    return {"gpt": _gpt_from_hf, "llama": _llama_from_hf, "mixtral": _mixtral_from_hf}[family](hf_config)


def _family_of(config: ModelConfig) -> str:
    """Which HF architecture computes what ``config`` computes; a clear error if none does."""
    family = {"learned": "gpt", "rope": "llama"}.get(config.position_embedding)
    if family is None:
        raise UnsupportedHFConfig(f"ModelConfig.position_embedding={config.position_embedding!r} has "
                                  "no Hugging Face counterpart here: GPT-2 uses 'learned', LLaMA 'rope'")
    want = (dict(norm="layernorm", activation="gelu", bias=True, final_norm=True) if family == "gpt"
            else dict(norm="rmsnorm", activation="swiglu", bias=False, final_norm=True))
    if family == "gpt":
        want.update(num_kv_heads=config.num_attention_heads,
                    head_dim=config.hidden_size // config.num_attention_heads)
    for field, value in want.items():
        if getattr(config, field) != value:
            hf = "GPT2LMHeadModel" if family == "gpt" else "LlamaForCausalLM"
            raise UnsupportedHFConfig(
                f"ModelConfig.{field}={getattr(config, field)!r}: {hf} (chosen by position_embedding="
                f"{config.position_embedding!r}) needs {field}={value!r}; no HF architecture matches")
    if config.num_experts == 0:
        return family
    for field, value, why in (("position_embedding", "rope", "only Mixtral (a LLaMA) has experts in HF"),
                              ("moe_every", 1, "MixtralForCausalLM's every layer is MoE"),
                              ("attention_bias", False, "MixtralForCausalLM has no attention biases"),
                              ("moe_capacity_factor", None, "MixtralForCausalLM drops no token")):
        if getattr(config, field) != value:
            raise UnsupportedHFConfig(f"ModelConfig.{field}={getattr(config, field)!r}: {why}; "
                                      f"MixtralForCausalLM needs {field}={value!r}")
    return "mixtral"


def config_to_hf(config: ModelConfig, **overrides: Any):
    """A ``GPT2Config`` / ``LlamaConfig`` computing what ``config`` computes (``overrides``: e.g. eos ids)."""
    family = _family_of(config)
    if family == "gpt":
        from transformers import GPT2Config
        act = "gelu_new" if config.gelu_approximate == "tanh" else "gelu"
        kw = dict(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.hidden_size,
                  n_layer=config.num_layers, n_head=config.num_attention_heads,
                  n_inner=config.ffn_hidden_size, activation_function=act,
                  layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout,
                  embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                  tie_word_embeddings=config.tie_embeddings, architectures=["GPT2LMHeadModel"],
                  bos_token_id=None, eos_token_id=None)
        kw.update(overrides)
        return GPT2Config(**kw)
    from transformers import LlamaConfig, MixtralConfig
    kw = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_kv_heads,
              max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
              **_rope_to_hf(config), hidden_act="silu", attention_bias=config.attention_bias,
              mlp_bias=False,
              attention_dropout=config.dropout, tie_word_embeddings=config.tie_embeddings,
              head_dim=config.head_dim, architectures=["LlamaForCausalLM"],
              bos_token_id=None, eos_token_id=None)
    if family == "mixtral":
        for field in ("attention_bias", "mlp_bias"):
            del kw[field]
        coeff = config.moe_aux_loss_coeff
        kw.update(num_local_experts=config.num_experts, num_experts_per_tok=config.moe_top_k,
                  output_router_logits=coeff > 0, router_aux_loss_coef=coeff / config.moe_top_k,
                  router_jitter_noise=0.0, sliding_window=None, architectures=["MixtralForCausalLM"])
    kw.update(overrides)
    return MixtralConfig(**kw) if family == "mixtral" else LlamaConfig(**kw)
