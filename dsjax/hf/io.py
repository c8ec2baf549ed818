"""Reading and writing hub-layout safetensors checkpoints (DeepSeek-V2/V3/R1, BF16 or FP8) without torch.

* :func:`load_hf` reads ``config.json`` and the ``*.safetensors`` shards listed in ``model.safetensors.index.json``
  (or a single ``model.safetensors``) one shard at a time: host memory holds one tensor at a time (plus FP8 weights
  whose scale sits in a later shard), while device arrays are filled in place. FP8 tensors (``weight`` e4m3 +
  ``weight_scale_inv`` per 128x128 block, partial edge blocks) are dequantised on load, or kept in FP8 with
  ``keep_fp8=True``. Missing, unexpected or mis-shaped tensors raise :class:`CheckpointError` naming them.
* :func:`save_hf` writes the same layout back (per-expert tensors, MTP layer at index ``num_hidden_layers`` with
  its duplicated embedding/head) so that a load -> save -> load round trip is lossless.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from dsjax.configs import ModelConfig, QuantizationConfig
from dsjax.hf.mapping import IGNORED_PATTERNS, TensorRule, leaf_rules, mtp_duplicate_names
from dsjax.model.layers import FP8Scale
from dsjax.model.transformer import Transformer

__all__ = ["CheckpointError", "load_hf", "save_hf", "checkpoint_files"]

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint does not match the model; the message lists the offending tensors."""


def _enable_numpy_ml_dtypes() -> None:
    # safetensors' numpy backend resolves dtypes as attributes of the numpy module; numpy itself has no bfloat16 /
    # float8 types, ml_dtypes does. Registering the ml_dtypes types under those names lets safetensors read BF16 and
    # F8_E4M3 tensors into numpy arrays without torch.
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        if not hasattr(np, name):
            setattr(np, name, getattr(ml_dtypes, name))


def checkpoint_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The safetensors files of a hub-layout folder, in index order (or the folder's single file)."""
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'. Fix: regenerate the index or remove it")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {str(path)!r}. Fix: pass a hub-layout model folder "
                              f"(config.json + model*.safetensors)")
    return files


def _dequant_np(w8: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    bo, bi = block
    n, k = w8.shape
    expected = (math.ceil(n / bo), math.ceil(k / bi))
    if scale.shape != expected:
        raise CheckpointError(f"weight_scale_inv of shape {scale.shape} does not match weight {w8.shape} with "
                              f"block size {block}: expected {expected}")
    full = np.repeat(np.repeat(scale.astype(np.float32), bo, axis=0), bi, axis=1)[:n, :k]
    return w8.astype(np.float32) * full


def _quant_np(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    from pallas_kernels import weight_quant

    q, s = weight_quant(jnp.asarray(w, jnp.float32), block_size=block)
    return np.asarray(q), np.asarray(s)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _write_slice(buf, value, index, n_lead):
    starts = tuple(index[i] for i in range(n_lead)) + (0,) * (buf.ndim - n_lead)
    return jax.lax.dynamic_update_slice(buf, value.reshape((1,) * n_lead + value.shape), starts)


class _Assembler:
    """Fills device arrays leaf by leaf; stacked leaves (layers, experts) are updated in place."""

    def __init__(self, abstract: dict[tuple, jax.ShapeDtypeStruct], shardings: dict[tuple, Any]):
        self.abstract = abstract
        self.shardings = shardings
        self.arrays: dict[tuple, jax.Array] = {}

    def put(self, path: tuple, index: tuple, value: np.ndarray) -> None:
        spec = self.abstract[path]
        sharding = self.shardings.get(path)
        if not index:
            self.arrays[path] = jax.device_put(value, sharding)
            return
        if path not in self.arrays:
            zeros = functools.partial(jnp.zeros, spec.shape, spec.dtype)
            self.arrays[path] = jax.jit(zeros, out_shardings=sharding)() if sharding is not None else zeros()
        # with a sharding, numpy goes straight to the jitted update (no single-device copy; multi-process safe)
        value = value if sharding is not None else jnp.asarray(value)
        self.arrays[path] = _write_slice(self.arrays[path], value, np.asarray(index, np.int32), len(index))


def _to_leaf(rule: TensorRule, arr: np.ndarray) -> np.ndarray:
    if rule.kind == "linear":
        return arr.T.reshape(rule.sub_shape)
    return arr.reshape(rule.sub_shape)          # copy, scale and FP8-stored weights keep the hub layout


def _from_leaf(rule: TensorRule, sub: np.ndarray) -> np.ndarray:
    if rule.kind == "linear":
        n_in = math.prod(rule.sub_shape[:rule.n_in])
        return np.ascontiguousarray(sub.reshape(n_in, -1).T)
    return np.ascontiguousarray(sub.reshape(rule.hf_shape))


def _report(missing, unexpected, mismatched, path) -> None:
    if not (missing or unexpected or mismatched):
        return

    def block(title, items):
        if not items:
            return ""
        shown = "\n".join(f"    {x}" for x in items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n{shown}{more}"

    raise CheckpointError(
        f"checkpoint {str(path)!r} does not match the model built from its config.json:"
        + block("missing tensors", sorted(missing))
        + block("unexpected tensors", sorted(unexpected))
        + block("shape mismatches (name: checkpoint shape vs expected)", mismatched)
        + "\nFix: check that config.json belongs to these weights (layer/expert counts, q_lora_rank, "
          "num_nextn_predict_layers); pass mtp=False to ignore an MTP layer.")


def load_hf(path: str | os.PathLike, *, dtype=jnp.bfloat16, compute_dtype=None, keep_fp8: bool = False,
            mtp: bool = True, scan_layers: bool = False, remat_policy: str = "none",
            sharding_fn: Callable[[tuple, Any], Any] | None = None, plan: Any = None,
            config_overrides: dict[str, Any] | None = None) -> Transformer:
    """Builds a :class:`~dsjax.Transformer` from a local hub-layout folder.

    Args:
      path: folder with ``config.json`` and ``*.safetensors`` (+ ``model.safetensors.index.json`` when sharded).
      dtype: parameter dtype (the router weight and routing bias always stay float32).
      compute_dtype: activation dtype; defaults to ``dtype``.
      keep_fp8: keep MLA/MLP/expert weights in float8_e4m3fn with their block scales (dequantised on the fly);
        BF16 tensors are quantised on load in that mode. Otherwise FP8 tensors are dequantised on load.
      mtp: load the MTP module(s) at layer index ``num_hidden_layers``; False drops them (and ignores their
        tensors).
      scan_layers / remat_policy: dsjax runtime options of the built model.
      sharding_fn: optional ``(leaf_path, abstract_variable) -> jax.sharding.Sharding``; tensors are placed with
        it as they are read (shard by shard), so the model never materialises on one device.
      plan: a :class:`dsjax.sharding.Plan`: shorthand for ``sharding_fn`` from its mesh and rules table.
      config_overrides: other :class:`~dsjax.configs.ModelConfig` fields of the built model, e.g. its runtime
        choices (``{"routing_impl": "xla", "fp8_weight_kernel_min_rows": 1}``); unknown names raise.
    """
    _enable_numpy_ml_dtypes()
    from safetensors import safe_open

    path = pathlib.Path(path)
    dtype_name = jnp.dtype(dtype).name
    cfg = ModelConfig.from_hf_config(path, dtype=jnp.dtype(compute_dtype or dtype).name, param_dtype=dtype_name,
                                     scan_layers=scan_layers, remat_policy=remat_policy, **(config_overrides or {}))
    ckpt_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    qc = cfg.quantization_config or QuantizationConfig()
    block = qc.weight_block_size

    abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), fp8=keep_fp8))
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(abstract_state))
    specs = {p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in flat}
    if sharding_fn is None and plan is not None:
        from dsjax.sharding import sharding_fn as plan_sharding_fn
        from dsjax.sharding import validate

        validate(cfg, plan, state=abstract_state)   # heads, experts, every weight dimension: a clear error up front
        sharding_fn = plan_sharding_fn(plan)
    shardings = {p: sharding_fn(p, v) for p, v in flat} if sharding_fn is not None else {}
    rules = leaf_rules(cfg, {p: s.shape for p, s in specs.items()})
    by_name = {r.hf_name: r for r in rules}
    scale_rule_of = {r.hf_name[:-len("_scale_inv")]: r for r in rules if r.kind == "scale"}
    duplicates = mtp_duplicate_names(cfg)

    asm = _Assembler(specs, shardings)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    pending_fp8: dict[str, tuple[TensorRule, np.ndarray]] = {}   # FP8 weights waiting for their scale
    scales: dict[str, np.ndarray] = {}                            # companion scales (dequantise-on-load mode)

    def place(rule: TensorRule, arr: np.ndarray) -> None:
        target = specs[rule.leaf].dtype
        asm.put(rule.leaf, rule.index, _to_leaf(rule, arr).astype(target, copy=False))
        loaded.add(rule.hf_name)

    def handle(name: str, rule: TensorRule, arr: np.ndarray) -> None:
        is_fp8 = arr.dtype == ml_dtypes.float8_e4m3fn
        leaf_fp8 = specs[rule.leaf].dtype == jnp.float8_e4m3fn
        if tuple(arr.shape) != rule.hf_shape:
            mismatched.append(f"{name}: {tuple(arr.shape)} vs {rule.hf_shape}")
            loaded.add(name)
            return
        if is_fp8 and not leaf_fp8:
            scale = scales.pop(name + "_scale_inv", None)
            if scale is None:
                pending_fp8[name] = (rule, arr)
                return
            arr = _dequant_np(arr, scale, block)
        elif leaf_fp8 and not is_fp8:
            srule = scale_rule_of[name]
            q, s = _quant_np(arr.astype(np.float32), block)
            place(srule, s)
            arr = q
        place(rule, arr)

    for file in checkpoint_files(path):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                rule = by_name.get(name)
                if rule is not None:
                    if rule.kind == "scale" and rule.hf_name in loaded:  # produced by on-load quantisation
                        continue
                    handle(name, rule, f.get_tensor(name))
                    continue
                if name.endswith("_scale_inv") and name[:-len("_scale_inv")] in by_name:
                    scales[name] = f.get_tensor(name)
                    weight = name[:-len("_scale_inv")]
                    if weight in pending_fp8:
                        r, w8 = pending_fp8.pop(weight)
                        handle(weight, r, w8)
                    continue
                if name in duplicates:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != (cfg.vocab_size, cfg.hidden_size):
                        mismatched.append(f"{name}: {shape} vs {(cfg.vocab_size, cfg.hidden_size)}")
                    continue
                if any(p.match(name) for p in IGNORED_PATTERNS):
                    continue
                m = _LAYER_RE.match(name)
                if m and not mtp and cfg.num_hidden_layers <= int(m.group(1)) < ckpt_layers:
                    continue
                unexpected.append(name)

    missing = [r.hf_name for r in rules if r.hf_name not in loaded]
    missing += [n + "_scale_inv" for n in pending_fp8]
    _report(missing, unexpected, mismatched, path)

    values = {p: asm.arrays[p] for p, _ in flat}
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
    return nnx.merge(graphdef, state)


def _plan_shards(entries: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for name, nbytes in entries:
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def save_hf(model_or_state: Transformer | nnx.State, cfg: ModelConfig | None, path: str | os.PathLike, *,
            dtype=None, max_shard_bytes: int = 4 * 2**30) -> list[pathlib.Path]:
    """Writes a hub-layout folder (``config.json``, ``model*.safetensors``, index when sharded).

    Args:
      model_or_state: a :class:`~dsjax.Transformer` or its ``nnx.state``.
      cfg: the model config (taken from the model when None).
      path: output folder (created).
      dtype: cast floating weights (except FP8 weights, their scales, the router and its bias) to this dtype;
        default keeps the stored dtypes, which makes ``load -> save`` lossless.
      max_shard_bytes: shard size limit; one tensor is never split.

    Returns the written safetensors files. Host memory holds one shard at a time.
    """
    _enable_numpy_ml_dtypes()
    from safetensors.numpy import save_file

    if isinstance(model_or_state, Transformer):
        cfg = cfg or model_or_state.cfg
        state = nnx.state(model_or_state)
    else:
        state = model_or_state
    if cfg is None:
        raise ValueError("save_hf needs cfg when given a state. Fix: pass the ModelConfig")
    flat = list(nnx.to_flat_state(state))
    arrays = {p: v.get_value() for p, v in flat}
    fp8 = any(isinstance(v, FP8Scale) for _, v in flat)
    rules = leaf_rules(cfg, {p: tuple(a.shape) for p, a in arrays.items()})
    by_name = {r.hf_name: r for r in rules}
    dupes = mtp_duplicate_names(cfg)
    cast = None if dtype is None else np.dtype(jnp.dtype(dtype))

    def tensor(name: str) -> np.ndarray:
        rule = by_name[dupes.get(name, name)]
        arr = arrays[rule.leaf]
        sub = np.asarray(jax.device_get(arr[rule.index] if rule.index else arr))
        out = _from_leaf(rule, sub)
        keep = out.dtype == ml_dtypes.float8_e4m3fn or rule.kind == "scale" or ".mlp.gate." in name
        if cast is not None and not keep and (out.dtype.kind == "f" or out.dtype == ml_dtypes.bfloat16):
            out = out.astype(cast)
        return out

    def nbytes(name: str) -> int:
        rule = by_name[dupes.get(name, name)]
        item = np.dtype(arrays[rule.leaf].dtype).itemsize if cast is None else cast.itemsize
        return math.prod(rule.hf_shape) * item

    names = [r.hf_name for r in rules] + list(dupes)
    shards = _plan_shards([(n, nbytes(n)) for n in names], max_shard_bytes)
    out_dir = pathlib.Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf_config()
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        if cfg.quantization_config is not None:
            hf_cfg["quantization_config"]["weight_block_size"] = list(cfg.quantization_config.weight_block_size)
    else:
        hf_cfg.pop("quantization_config", None)
    if dtype is not None:
        hf_cfg["torch_dtype"] = jnp.dtype(dtype).name
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))

    written, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensor(n) for n in shard}, str(out_dir / fname), metadata={"format": "pt"})
        written.append(out_dir / fname)
        weight_map.update({n: fname for n in shard})
    index = out_dir / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(nbytes(n) for n in names)
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()
    return written
