"""The one name map between dsjax parameters and Hugging Face / DeepSeek hub checkpoint tensors.

Every dsjax leaf (a path in ``nnx.state(model)``) corresponds to one or more hub tensors:

==========================================  ================================================================
dsjax leaf                                  hub tensor (``[out, in]`` weights)
==========================================  ================================================================
``embed_tokens.embedding [V, D]``           ``model.embed_tokens.weight`` (as is)
``layers.{i}.<module>.kernel (*I, *O)``     ``model.layers.{i}.<module>.weight`` transposed, reshaped
``layers.{i}.<module>.kernel (*O, *I)``     the same, FP8-stored: ``weight`` as it is (``[out, in]``), reshaped
``layers.{i}.<module>.scale_inv``           ``model.layers.{i}.<module>.weight_scale_inv`` as it is (FP8)
``layers.{i}.<norm>.weight``                ``model.layers.{i}.<norm>.weight``
``layers.{i}.mlp.gate.weight [D, E]``       ``model.layers.{i}.mlp.gate.weight [E, D]``
``...mlp.gate.e_score_correction_bias``     same name (float32)
``...mlp.experts.gate_proj [E, D, F]``      ``...mlp.experts.{e}.gate_proj.weight [F, D]`` for each e
``...mlp.experts.gate_proj [E, F, D]``      the same, FP8-stored: each expert's ``weight`` as it is
``...mlp.experts.gate_proj_scale_inv``      ``...mlp.experts.{e}.gate_proj.weight_scale_inv`` (FP8, as it is)
``dense_layers`` / ``moe_layers`` (scan)    the same per layer, stacked on a leading axis (layer ``k + j``)
``norm.weight``, ``lm_head.kernel [D, V]``  ``model.norm.weight``, ``lm_head.weight [V, D]``
``mtp.{j}.enorm/hnorm/eh_proj``             ``model.layers.{L+j}.enorm/hnorm/eh_proj`` (L = num_hidden_layers)
``mtp.{j}.shared_head_norm.weight``         ``model.layers.{L+j}.shared_head.norm.weight``
``mtp.{j}.block.<layer>``                   ``model.layers.{L+j}.<layer>`` (a full MoE decoder layer)
==========================================  ================================================================

The MTP layers' own copies of the embedding and head (``model.layers.{L+j}.embed_tokens.weight`` and
``...shared_head.head.weight``) duplicate the main ones: they are checked for shape and ignored on load, and
written back on save so that a saved folder has the release layout.
"""

from __future__ import annotations

import dataclasses
import math
import re

from dsjax.configs import ModelConfig

__all__ = ["TensorRule", "leaf_rules", "mtp_duplicate_names", "IGNORED_PATTERNS"]

# Tensors some checkpoints carry that hold no parameters.
IGNORED_PATTERNS = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one hub tensor fills (part of) one dsjax leaf.

    Attributes:
      hf_name: the hub tensor name.
      leaf: the dsjax state path (tuple of keys / indices).
      index: leading indices inside the leaf this tensor fills (stacked layer, expert); ``()`` = whole leaf.
      kind: ``"copy"`` (same layout), ``"linear"`` (hub ``[out, in]`` = transpose of the flattened kernel),
        ``"fp8"`` (an FP8-stored weight: hub ``[out, in]`` reshaped to the leaf's ``(*O, *I)``) or ``"scale"``
        (block scales, the hub layout).
      n_in: number of "input" axes of the leaf slice (``linear``: the leading ones; ``fp8``: the trailing ones).
      sub_shape: shape of the leaf slice this tensor fills.
    """

    hf_name: str
    leaf: tuple
    index: tuple
    kind: str
    n_in: int
    sub_shape: tuple

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.kind == "copy":
            return self.sub_shape
        if self.kind == "scale":
            return self.sub_shape
        if self.kind == "fp8":
            n_out = len(self.sub_shape) - self.n_in
            return (math.prod(self.sub_shape[:n_out]), math.prod(self.sub_shape[n_out:]))
        n_in = math.prod(self.sub_shape[:self.n_in])
        n_out = math.prod(self.sub_shape[self.n_in:])
        return (n_out, n_in)


def _layer_tensor(rel: tuple[str, ...]) -> tuple[str, str, int] | None:
    """Maps a path inside a decoder layer to ``(hub suffix, kind, n_in)``; None for expert leaves."""
    *mods, leafname = rel
    if mods[:2] == ["mlp", "experts"]:
        return None
    mod = ".".join(mods)
    if leafname == "kernel":
        return f"{mod}.weight", "linear", 2 if mods[-1] == "o_proj" else 1
    if leafname == "scale_inv":
        return f"{mod}.weight_scale_inv", "scale", 0
    if leafname == "bias":
        return f"{mod}.bias", "copy", 0
    if mods == ["mlp", "gate"] and leafname == "weight":
        return "mlp.gate.weight", "linear", 1
    if leafname in ("weight", "e_score_correction_bias"):
        return f"{mod}.{leafname}", "copy", 0
    raise KeyError(f"no hub name for layer leaf {rel}")


def _layer_rules(prefix: str, leaf: tuple, rel: tuple[str, ...], index: tuple, sub_shape: tuple) -> list[TensorRule]:
    mapped = _layer_tensor(rel)
    if mapped is not None:
        suffix, kind, n_in = mapped
        return [TensorRule(f"{prefix}.{suffix}", leaf, index, kind, n_in, sub_shape)]
    # routed experts: one tensor per expert along the leading E axis of the slice
    name = rel[-1]
    proj, is_scale = (name[:-len("_scale_inv")], True) if name.endswith("_scale_inv") else (name, False)
    rules = []
    for e in range(sub_shape[0]):
        hf = f"{prefix}.mlp.experts.{e}.{proj}.weight" + ("_scale_inv" if is_scale else "")
        rules.append(TensorRule(hf, leaf, index + (e,), "scale" if is_scale else "linear", 1, sub_shape[1:]))
    return rules


def leaf_rules(cfg: ModelConfig, leaves: dict[tuple, tuple[int, ...]]) -> list[TensorRule]:
    """All tensor rules for a model whose state leaves (path -> shape) are ``leaves``. A weight with a block-scale
    sibling (``scale_inv`` in its module, ``<name>_scale_inv`` beside an expert stack) is FP8-stored: kind
    ``"fp8"``, in the hub's own layout."""
    rules = _rules(cfg, leaves)
    fp8 = {p[:-1] + (("kernel",) if p[-1] == "scale_inv" else (p[-1][:-len("_scale_inv")],))
           for p in leaves if isinstance(p[-1], str) and p[-1].endswith("scale_inv")}
    return [dataclasses.replace(r, kind="fp8") if r.kind == "linear" and r.leaf in fp8 else r for r in rules]


def _rules(cfg: ModelConfig, leaves: dict[tuple, tuple[int, ...]]) -> list[TensorRule]:
    k, n = cfg.first_k_dense_replace, cfg.num_hidden_layers
    rules: list[TensorRule] = []
    for path, shape in leaves.items():
        head, rest = path[0], path[1:]
        if head == "embed_tokens":
            rules.append(TensorRule("model.embed_tokens.weight", path, (), "copy", 0, shape))
        elif head == "norm":
            rules.append(TensorRule("model.norm.weight", path, (), "copy", 0, shape))
        elif head == "lm_head":
            if rest[-1] == "kernel":
                rules.append(TensorRule("lm_head.weight", path, (), "linear", 1, shape))
            else:
                raise KeyError(f"no hub name for {path}")
        elif head == "layers":
            i, rel = rest[0], tuple(rest[1:])
            rules += _layer_rules(f"model.layers.{i}", path, rel, (), shape)
        elif head in ("dense_layers", "moe_layers"):
            offset = 0 if head == "dense_layers" else k
            for j in range(shape[0]):
                rules += _layer_rules(f"model.layers.{offset + j}", path, tuple(rest), (j,), shape[1:])
        elif head == "mtp":
            j, rel = rest[0], tuple(rest[1:])
            prefix = f"model.layers.{n + j}"
            if rel[0] == "block":
                rules += _layer_rules(prefix, path, rel[1:], (), shape)
            elif rel[0] in ("enorm", "hnorm"):
                rules.append(TensorRule(f"{prefix}.{rel[0]}.weight", path, (), "copy", 0, shape))
            elif rel[0] == "shared_head_norm":
                rules.append(TensorRule(f"{prefix}.shared_head.norm.weight", path, (), "copy", 0, shape))
            elif rel[0] == "eh_proj":
                mapped = _layer_tensor(rel)
                rules.append(TensorRule(f"{prefix}.{mapped[0]}", path, (), mapped[1], mapped[2], shape))
            else:
                raise KeyError(f"no hub name for {path}")
        else:
            raise KeyError(f"no hub name for {path}")
    return rules


def mtp_duplicate_names(cfg: ModelConfig) -> dict[str, str]:
    """Hub names of the MTP layers' copies of the embedding / head -> the main tensor they duplicate."""
    out = {}
    for j in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + j}"
        out[f"{p}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{p}.shared_head.head.weight"] = "model.embed_tokens.weight" if cfg.tie_word_embeddings \
            else "lm_head.weight"
    return out
