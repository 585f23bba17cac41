"""Open-weights checkpoints: Hugging Face Llama-family directories in and out of `transformer_lm`.

A directory as `save_pretrained` writes it: `config.json`, the weights in `model.safetensors`
(or shards listed by `model.safetensors.index.json`) and the tokenizer in `tokenizer.json`.

    model_kwargs, variables, tokenizer = load_hf("path/to/Qwen2.5-0.5B", "bfloat16")
    module = models.build_model("transformer_lm", tokenizer.vocab_size, **model_kwargs)
    logits = module.apply(variables, ids)

Supported `model_type`s (`SUPPORTED`): llama, mistral, qwen2: pre-norm blocks with RMSNorm
(`rms_norm_eps`), grouped-query attention, SwiGLU, RoPE (`rope_theta`, `rope_scaling` of type
'linear' or 'llama3'), tied or untied embeddings, and Qwen2's query/key/value biases. Their RoPE
pairs dimension j with j + D/2 ("rotate half"), as `transformer.rope` does, so the weights load
unpermuted. A sliding window (Mistral's; Qwen2's when a layer slides: `_sliding_window`)
becomes the model's context when shorter (within the window the two attentions are the same),
so a longer sequence is refused, never silently wrong.

`load_hf(..., shardings=...)` builds each parameter as a global `jax.Array` with the sharding
the run gives it, each process reading only its devices' slices of the safetensors files.

`export_hf` writes the same layout back (config.json, model.safetensors, tokenizer.json), so a
student distilled here loads in other tools; `load_hf(export_hf(...))` gives the same arrays.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.models.hf_loading import (
  HfCheckpointError,
  get_path,
  locate_weights,
  read_json,
  read_sharded,
  read_slice,
  set_path,
  to_file_layout,
)
from distill_jax.models.tokenizers import HfTokenizer

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _rope_settings(config: Mapping[str, Any], path: str) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling for TransformerLM) from either config.json convention:
  transformers < 5 (`rope_theta` + `rope_scaling`) or >= 5 (`rope_parameters`)."""
  params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
  theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
  kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
  if kind == "default":
    return theta, None
  from distill_jax.models.transformer import ROPE_SCALINGS
  if kind not in ROPE_SCALINGS:
    raise HfCheckpointError(f"{path}: RoPE scaling type {kind!r} is not supported; the "
                            f"supported types are {list(ROPE_SCALINGS)} and 'default'.")
  keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}[kind]
  missing = [k for k in keys if k not in params]
  if missing:
    raise HfCheckpointError(f"{path}: RoPE scaling {kind!r} needs {missing}.")
  return theta, {"type": kind, **{k: int(params[k]) if k.startswith("original") else
                                  float(params[k]) for k in keys}}


def model_kwargs_from_config(config: Mapping[str, Any], path: str = "config.json"
                             ) -> dict[str, Any]:
  """`transformer_lm` keyword arguments (all but `num_classes`) for a Hugging Face config."""
  model_type = config.get("model_type")
  if model_type not in SUPPORTED:
    raise HfCheckpointError(f"{path}: model_type {model_type!r} (architectures "
                            f"{config.get('architectures')}) is not supported; the supported "
                            f"model types are {sorted(SUPPORTED)}.")
  if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias") or (
      model_type != "qwen2" and config.get("attention_bias")):
    raise HfCheckpointError(f"{path}: hidden_act {config.get('hidden_act')!r}, mlp_bias or "
                            "attention_bias are not the Llama-family layout (silu, no biases).")
  width, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
  head_dim = config.get("head_dim") or width // heads
  if head_dim * heads != width:
    raise HfCheckpointError(f"{path}: head_dim {head_dim} x num_attention_heads {heads} != "
                            f"hidden_size {width}; transformer_lm needs them equal.")
  context = int(config.get("max_position_embeddings", 2048))
  window = _sliding_window(config)
  if window:
    context = min(context, window)
  theta, scaling = _rope_settings(config, path)
  return {"num_layers": int(config["num_hidden_layers"]), "width": width, "num_heads": heads,
          "num_kv_heads": int(config.get("num_key_value_heads") or heads),
          "mlp_dim": int(config["intermediate_size"]), "context": context,
          "tie_embeddings": bool(config.get("tie_word_embeddings", False)), "bos_id": None,
          "rope_base": theta, "rope_scaling": scaling, "qkv_bias": model_type == "qwen2",
          "norm_eps": float(config.get("rms_norm_eps", 1e-6))}


def _sliding_window(config: Mapping[str, Any]) -> int | None:
  """The window of the layers that slide, None when none does (transformers' rule).

  Llama: none. Mistral: every layer, when `sliding_window` is set. Qwen2: only with
  `use_sliding_window`, and then the layers `layer_types` names 'sliding_attention' (when
  config.json lists them), else layers i >= `max_window_layers` (default 28); so a Qwen2 with
  `use_sliding_window: true` whose `max_window_layers` >= `num_hidden_layers` slides nowhere.
  """
  window = config.get("sliding_window")
  if not window:
    return None
  if config.get("model_type") != "qwen2":
    return int(window) if config.get("model_type") == "mistral" else None
  if not config.get("use_sliding_window", False):
    return None
  layers = int(config["num_hidden_layers"])
  kinds = config.get("layer_types") or [
      "sliding_attention" if i >= int(config.get("max_window_layers", 28)) else
      "full_attention" for i in range(layers)]
  return int(window) if "sliding_attention" in kinds else None


def _hf_names(kwargs: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], str]]:
  """HF weight name -> (our param path, how to convert it): PyTorch's `[out, in]` as ours:
  'dense' [out, in] -> [in, out]; 'heads' [heads * head_dim, width] -> [width, heads,
  head_dim]; 'out' [width, heads * head_dim] -> [heads, head_dim, width]; 'bias'
  [heads * head_dim] -> [heads, head_dim]; 'same' as it is (`read_slice` applies them)."""
  names = {"model.embed_tokens.weight": (("embed", "embedding"), "same"),
           "model.norm.weight": (("final_norm", "scale"), "same")}
  if not kwargs["tie_embeddings"]:
    names["lm_head.weight"] = (("head", "kernel"), "dense")
  for i in range(kwargs["num_layers"]):
    hf, ours = f"model.layers.{i}.", f"block{i}"
    names[hf + "input_layernorm.weight"] = ((ours, "attn_norm", "scale"), "same")
    names[hf + "post_attention_layernorm.weight"] = ((ours, "mlp_norm", "scale"), "same")
    for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      names[f"{hf}self_attn.{proj}.weight"] = ((ours, "attn", name, "kernel"), "heads")
      if kwargs["qkv_bias"]:
        names[f"{hf}self_attn.{proj}.bias"] = ((ours, "attn", name, "bias"), "bias")
    names[hf + "self_attn.o_proj.weight"] = ((ours, "attn", "out", "kernel"), "out")
    for proj in ("gate", "up", "down"):
      names[f"{hf}mlp.{proj}_proj.weight"] = ((ours, "mlp", proj, "kernel"), "dense")
  return names


def load_hf(path: str, dtype: str = "float32", shardings: Any = None
            ) -> tuple[dict[str, Any], Any, HfTokenizer]:
  """Loads a Hugging Face Llama-family directory: `(model_kwargs, variables, tokenizer)`.

  `model_kwargs` build the same network as `transformer_lm` (with `num_classes =
  tokenizer.vocab_size`, the embedding's rows); `variables` is `{'params': ...}` with every
  array in `dtype` ('float32' or 'bfloat16'). Errors name the file, the setting or the weight.

  `shardings`: None reads each weight whole onto the default device. Otherwise a pytree of
  `jax.sharding.Sharding`s laid out like `variables`, or a function of the variables'
  `ShapeDtypeStruct`s and the Flax module to one (e.g. `Parallel.teacher_shardings_of`, which
  reads the module's tensor-parallel rules): each parameter is then a
  global `jax.Array` with that sharding, and each process reads from the safetensors files
  only the slices its own devices hold (`read_slice`), so its host memory is about its
  shards, not the model. Every process must call it (as with any global array).

  A tied checkpoint (`tie_word_embeddings`) that also stores `lm_head.weight` loads with the
  embedding as the head, as transformers does (it ties the head to the embedding after
  loading); the stored head is not read.
  """
  if dtype not in DTYPES:
    raise HfCheckpointError(f"dtype {dtype!r} for {path}: choose one of {list(DTYPES)}.")
  config_path = os.path.join(path, "config.json")
  config = read_json(config_path)
  kwargs = model_kwargs_from_config(config, config_path)
  tokenizer = HfTokenizer.from_dir(path)
  from distill_jax.models.transformer import TransformerLM
  module = TransformerLM(num_classes=int(config["vocab_size"]), **kwargs)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 1), jnp.int32)))
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, DTYPES[dtype]), shapes)
  where_from = locate_weights(path, _hf_names(kwargs), shapes["params"],
                              f"{config['model_type']} layout transformer_lm loads",
                              ignored=lambda key: _ignored(key, kwargs))
  if callable(shardings):
    shardings = shardings(shapes, module)
  params: dict = {}
  for keys, like in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
    where = tuple(k.key for k in keys)
    file, key, how = where_from[where]
    if shardings is None:
      array = jnp.asarray(read_slice(file, key, how, like.shape, like.dtype))
    else:
      array = read_sharded(file, key, how, like.shape, like.dtype,
                            get_path(shardings["params"], where))
    set_path(params, where, array)
  return kwargs, {"params": params}, tokenizer


def _ignored(key: str, kwargs: Mapping[str, Any]) -> bool:
  """A stored weight that is not ours to load: a RoPE buffer older exports kept (recomputed),
  or the head of a tied checkpoint (transformers uses the embedding as the head; see
  load_hf)."""
  return key.endswith("rotary_emb.inv_freq") or (
      key == "lm_head.weight" and bool(kwargs["tie_embeddings"]))


def hf_config(model_kwargs: Mapping[str, Any], vocab_size: int,
              tokenizer: HfTokenizer | None = None, dtype: str = "float32") -> dict[str, Any]:
  """A Llama (or, with q/k/v biases, Qwen2) `config.json` for `transformer_lm` kwargs."""
  from distill_jax.models.transformer import TransformerLM
  m = TransformerLM(num_classes=vocab_size, **model_kwargs)
  if m.bos_id is not None:
    # HF's models let packed documents attend to each other; ours would not: not the same net.
    raise HfCheckpointError("export_hf: a transformer_lm with bos_id set (document-masked "
                            "attention) has no Hugging Face equivalent; export one with "
                            "bos_id=None.")
  model_type = "qwen2" if m.qkv_bias else "llama"
  rope: dict[str, Any] = {"rope_theta": float(m.rope_base), "rope_type": "default"}
  if m.rope_scaling:
    scaling = dict(m.rope_scaling)
    rope = {"rope_theta": float(m.rope_base), "rope_type": scaling.pop("type"), **scaling}
  config = {
      "architectures": [SUPPORTED[model_type]], "model_type": model_type,
      "vocab_size": vocab_size, "hidden_size": m.width, "intermediate_size":
      m.mlp_dim or 4 * m.width, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads or m.num_heads,
      "head_dim": m.width // m.num_heads, "hidden_act": "silu",
      "max_position_embeddings": m.context, "rms_norm_eps": m.norm_eps,
      "tie_word_embeddings": m.tie_embeddings, "rope_theta": rope["rope_theta"],
      "rope_scaling": None if rope["rope_type"] == "default" else rope,
      "rope_parameters": rope, "torch_dtype": dtype, "dtype": dtype}
  if tokenizer is not None:
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                  pad_token_id=tokenizer.pad_id)
  return config


def export_hf(variables: Any, model_kwargs: Mapping[str, Any], path: str,
              tokenizer: HfTokenizer | str | None = None) -> str:
  """Writes `variables` of a `transformer_lm` as a Hugging Face directory at `path`:
  config.json, model.safetensors (in the variables' dtype) and, given a tokenizer (or the
  directory or tokenizer.json it came from), a copy of its tokenizer.json. Returns `path`."""
  from safetensors.flax import save_file
  params = variables["params"] if "params" in variables else variables
  vocab = int(params["embed"]["embedding"].shape[0])
  if isinstance(tokenizer, str):
    tokenizer = HfTokenizer.from_dir(tokenizer)
  dtype = jnp.dtype(params["embed"]["embedding"].dtype).name
  config = hf_config(model_kwargs, vocab, tokenizer, dtype)
  kwargs = model_kwargs_from_config(config)
  tensors = {key: jnp.asarray(to_file_layout(jnp.asarray(get_path(params, where)), how))
             for key, (where, how) in _hf_names(kwargs).items()}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    target = os.path.join(path, "tokenizer.json")
    if os.path.abspath(tokenizer.path) != os.path.abspath(target):
      shutil.copy(tokenizer.path, target)
  return path


def student_config(path: str, **overrides: Any) -> Any:
  """`config.student` for a student initialised from the Hugging Face directory `path`:
  `transformer_lm` with the directory's architecture (`overrides` replace kwargs, e.g.
  `remat`) and `init=path`, which the run loads (float32) before the first step.

      c.student = hf.student_config('/models/Qwen2.5-0.5B')
  """
  import ml_collections
  kwargs = model_kwargs_from_config(read_json(os.path.join(path, "config.json")),
                                    os.path.join(path, "config.json"))
  return ml_collections.ConfigDict({"name": "transformer_lm", "kwargs": {**kwargs, **overrides},
                                    "remat": False, "init": path})


def load_student_init(path: str, name: str, kwargs: Mapping[str, Any], data_tokenizer: str
                      ) -> Any:
  """The variables that initialise the student from `config.student.init = path`, checked
  against the configured student: the same architecture (`transformer_lm` with the
  directory's kwargs) and the data's tokenizer. Errors name the settings that differ."""
  want, variables, tokenizer = load_hf(path, "float32")
  if name != "transformer_lm":
    raise HfCheckpointError(f"config.student.init={path!r} loads a transformer_lm, but "
                            f"config.student.name is {name!r}.")
  kwargs = dict(kwargs)
  differ = sorted(k for k in want if k in kwargs and _plain(kwargs[k]) != _plain(want[k])) + \
      sorted(k for k in want if k not in kwargs and want[k] != _DEFAULTS.get(k))
  if differ:
    raise HfCheckpointError(
        f"config.student.init={path!r}: config.student.kwargs differ from its config.json in "
        f"{differ} ({ {k: kwargs.get(k) for k in differ} } vs { {k: want[k] for k in differ} }); "
        "build config.student with models.hf.student_config(path).")
  ours = HfTokenizer.from_dir(data_tokenizer[3:]) if data_tokenizer.startswith("hf:") else None
  if ours is None or ours.fingerprint() != tokenizer.fingerprint():
    raise HfCheckpointError(
        f"config.student.init={path!r} uses the tokenizer {tokenizer.path} but the data uses "
        f"{getattr(ours, 'path', data_tokenizer)!r} (config.data.tokenizer); set "
        f"--config.data.tokenizer=hf:{path}.")
  return variables


_DEFAULTS = {"rope_scaling": None, "qkv_bias": False, "norm_eps": 1e-6, "bos_id": None}


def _plain(value: Any) -> Any:
  """Config values as plain Python (ConfigDict -> dict, tuples -> lists), to compare."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value

