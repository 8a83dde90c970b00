"""The architecture map: where each model family keeps its blocks, embeddings, Q/K/V/O and FFN.

All architecture knowledge lives in one table, :data:`ARCHITECTURES`, keyed by
``config.model_type``. Everything else (freezing, diagnostics, LRCP) asks :func:`model_map` and
never matches module names itself. Unknown model types go through a generic discovery; when that
fails, :class:`~mitigate.errors.UnsupportedArchitectureError` names the override arguments.

Fused QKV layouts (the output axis of the fused weight, ``hd`` = head dim, ``g = n_heads / n_kv``):

* ``"concat"``: ``[Q (n_heads·hd) | K (n_kv·hd) | V (n_kv·hd)]`` — GPT-2 ``c_attn`` (a Conv1D, so
  the output axis is dim 1), MPT ``Wqkv``, Phi-3 ``qkv_proj``, GPTBigCode and Falcon multi-query.
* ``"grouped"``: per KV group ``[q₁ … q_g | k | v]``, each ``hd`` wide — GPT-NeoX, Bloom,
  GPTBigCode (multi-head) and classic Falcon with ``g = 1`` (interleaved per head), Falcon's
  "new decoder architecture" with ``g = n_heads / num_kv_heads``.

Layer indices come from parsing the block list, never from substring matches: ``layers.1`` is a
different block from ``layers.10``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from mitigate.errors import UnsupportedArchitectureError

Layout = Literal["separate", "concat", "grouped"]
Path = Union[str, tuple[str, ...]]
"""A dotted module path relative to its parent, or a tuple of alternatives (first present wins)."""

GROUPS = ("q", "k", "v", "qkv", "o", "ffn", "router", "embed", "norm", "head", "other")
"""Module groups used by :meth:`ModelMap.param_groups` (``qkv`` is a fused Q/K/V weight)."""


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class AttentionSpec:
    """Where one attention module's projections live, relative to a block.

    Either ``q``/``k``/``v`` (separate projections) or ``qkv`` with a ``layout`` is given.
    ``layout`` may be a callable of the config when it depends on it (Falcon, GPTBigCode).
    ``optional`` attentions are skipped in blocks that lack them (T5's cross-attention).
    """

    o: Path
    q: Path | None = None
    k: Path | None = None
    v: Path | None = None
    qkv: Path | None = None
    layout: Layout | Callable[[Any], Layout] = "separate"
    kind: Literal["self", "cross"] = "self"
    optional: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table.

    Attributes:
        blocks: dotted suffixes of the ``nn.ModuleList``(s) of transformer blocks; several for
            encoder-decoder models (one stack each).
        embeddings: dotted suffixes of input embedding modules (token, position, embedding norm).
        attention: the attention modules of each block.
        mlp: prefixes (relative to a block) of the feed-forward network or experts.
        router: MoE router path relative to a block, if any.
        dims: ``config -> (n_heads, n_kv_heads, head_dim)``; ``None`` reads the usual attributes.
    """

    blocks: tuple[str, ...]
    embeddings: tuple[str, ...]
    attention: tuple[AttentionSpec, ...]
    mlp: tuple[str, ...]
    router: Path | None = None
    dims: Callable[[Any], tuple[int, int, int]] | None = None


def _falcon_dims(cfg: Any) -> tuple[int, int, int]:
    nh = cfg.num_attention_heads
    if getattr(cfg, "new_decoder_architecture", False):
        nkv = cfg.num_kv_heads
    elif getattr(cfg, "multi_query", True):
        nkv = 1
    else:
        nkv = nh
    return nh, nkv, cfg.hidden_size // nh


def _falcon_layout(cfg: Any) -> Layout:
    if getattr(cfg, "new_decoder_architecture", False) or not getattr(cfg, "multi_query", True):
        return "grouped"
    return "concat"


def _bigcode_dims(cfg: Any) -> tuple[int, int, int]:
    nh = cfg.n_head
    return nh, 1 if cfg.multi_query else nh, cfg.n_embd // nh


def _bigcode_layout(cfg: Any) -> Layout:
    return "concat" if cfg.multi_query else "grouped"


def _separate(prefix: str, o: str = "o_proj", q="q_proj", k="k_proj", v="v_proj") -> AttentionSpec:
    return AttentionSpec(q=f"{prefix}.{q}", k=f"{prefix}.{k}", v=f"{prefix}.{v}", o=f"{prefix}.{o}")


_LLAMA_LIKE = ArchSpec(
    blocks=("layers",),
    embeddings=("embed_tokens",),
    attention=(_separate("self_attn"),),
    mlp=("mlp",),
)
_MOE_LIKE = ArchSpec(
    blocks=("layers",),
    embeddings=("embed_tokens",),
    attention=(_separate("self_attn"),),
    mlp=("mlp", "block_sparse_moe"),
    router=("mlp.gate", "block_sparse_moe.gate"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        blocks=("h",),
        embeddings=("wte", "wpe"),
        attention=(AttentionSpec(qkv="attn.c_attn", layout="concat", o="attn.c_proj"),),
        mlp=("mlp",),
    ),
    "gpt_neox": ArchSpec(
        blocks=("layers",),
        embeddings=("embed_in",),
        attention=(AttentionSpec(qkv="attention.query_key_value", layout="grouped", o="attention.dense"),),
        mlp=("mlp",),
    ),
    "bloom": ArchSpec(
        blocks=("h",),
        embeddings=("word_embeddings", "word_embeddings_layernorm"),
        attention=(
            AttentionSpec(qkv="self_attention.query_key_value", layout="grouped", o="self_attention.dense"),
        ),
        mlp=("mlp",),
    ),
    "falcon": ArchSpec(
        blocks=("h",),
        embeddings=("word_embeddings",),
        attention=(
            AttentionSpec(qkv="self_attention.query_key_value", layout=_falcon_layout, o="self_attention.dense"),
        ),
        mlp=("mlp",),
        dims=_falcon_dims,
    ),
    "gpt_bigcode": ArchSpec(
        blocks=("h",),
        embeddings=("wte", "wpe"),
        attention=(AttentionSpec(qkv="attn.c_attn", layout=_bigcode_layout, o="attn.c_proj"),),
        mlp=("mlp",),
        dims=_bigcode_dims,
    ),
    "mpt": ArchSpec(
        blocks=("blocks",),
        embeddings=("wte",),
        attention=(AttentionSpec(qkv="attn.Wqkv", layout="concat", o="attn.out_proj"),),
        mlp=("ffn",),
    ),
    "phi": ArchSpec(
        blocks=("layers",),
        embeddings=("embed_tokens",),
        attention=(_separate("self_attn", o="dense"),),
        mlp=("mlp",),
    ),
    "phi3": ArchSpec(
        blocks=("layers",),
        embeddings=("embed_tokens",),
        attention=(AttentionSpec(qkv="self_attn.qkv_proj", layout="concat", o="self_attn.o_proj"),),
        mlp=("mlp",),
    ),
    "opt": ArchSpec(
        blocks=("layers",),
        embeddings=("embed_tokens", "embed_positions", "project_in"),
        attention=(_separate("self_attn", o="out_proj"),),
        mlp=("fc1", "fc2"),
    ),
    "gptj": ArchSpec(
        blocks=("h",),
        embeddings=("wte",),
        attention=(_separate("attn", o="out_proj"),),
        mlp=("mlp",),
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "mixtral": _MOE_LIKE,
    "qwen2_moe": ArchSpec(
        blocks=("layers",),
        embeddings=("embed_tokens",),
        attention=(_separate("self_attn"),),
        mlp=("mlp",),
        router="mlp.gate",
    ),
    "bert": ArchSpec(
        blocks=("encoder.layer",),
        embeddings=("embeddings",),
        attention=(
            AttentionSpec(
                q="attention.self.query",
                k="attention.self.key",
                v="attention.self.value",
                o="attention.output.dense",
            ),
        ),
        mlp=("intermediate", "output"),
    ),
    "t5": ArchSpec(
        blocks=("encoder.block", "decoder.block"),
        embeddings=("shared", "embed_tokens"),
        attention=(
            _separate("layer.0.SelfAttention", o="o", q="q", k="k", v="v"),
            AttentionSpec(
                q="layer.1.EncDecAttention.q",
                k="layer.1.EncDecAttention.k",
                v="layer.1.EncDecAttention.v",
                o="layer.1.EncDecAttention.o",
                kind="cross",
                optional=True,
            ),
        ),
        mlp=("layer.1.DenseReluDense", "layer.2.DenseReluDense"),
        dims=lambda c: (c.num_heads, c.num_heads, c.d_kv),
    ),
}
ARCHITECTURES["roberta"] = ARCHITECTURES["bert"]
ARCHITECTURES["mt5"] = ARCHITECTURES["t5"]


# ----------------------------------------------------------------------------- resolved map


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: its stack (``"layers"``, ``"encoder.block"`` …), index in the stack,
    full module name and the module itself."""

    stack: str
    index: int
    name: str
    module: nn.Module = field(repr=False, compare=False)


@dataclass(frozen=True)
class ProjectionSlice:
    """Where one projection (Q, K, V or O) of one attention module lives.

    Attributes:
        module_name: full name of the module owning the weight (a PEFT LoRA wrapper if wrapped).
        param_name: full name of the weight ``Parameter`` (``…base_layer.weight`` under PEFT).
        dim: axis of the weight that indexes heads — the output axis for Q/K/V (0 for
            ``nn.Linear``, 1 for HF ``Conv1D``), the input axis for O.
        index: ``(n_heads_of_projection, head_dim)`` positions along ``dim``.
        bias_name: full name of the bias sliced by the same index (Q/K/V), else ``None``.
        lora: ``(lora_A name, lora_B name)`` parameter pairs of PEFT adapters on this module.
        fused: whether the weight also holds other projections (fused QKV).
    """

    module_name: str
    param_name: str
    dim: int
    index: Tensor = field(repr=False, compare=False)
    bias_name: str | None = None
    lora: tuple[tuple[str, str], ...] = ()
    fused: bool = False

    @property
    def num_heads(self) -> int:
        return int(self.index.shape[0])

    def rows(self, heads: list[int] | None = None) -> Tensor:
        """Flat positions along :attr:`dim` of the given heads (all when ``None``), sorted."""
        idx = self.index if heads is None else self.index[torch.as_tensor(heads, dtype=torch.long)]
        return idx.reshape(-1).sort().values


@dataclass(frozen=True)
class AttentionInfo:
    """The Q/K/V/O projections of one attention module of one block."""

    block: BlockInfo
    kind: str
    q: ProjectionSlice
    k: ProjectionSlice
    v: ProjectionSlice
    o: ProjectionSlice

    def kv_head_of(self, head: int) -> int:
        """Index of the K/V head that query head ``head`` attends with (GQA/MQA grouping)."""
        return head // (self.q.num_heads // self.k.num_heads)


@dataclass(frozen=True)
class ParamGroup:
    """Classification of one parameter: its group (see :data:`GROUPS`), stack and layer."""

    group: str
    stack: str | None = None
    layer: int | None = None


class ModelMap:
    """The resolved architecture of one model instance. Build it with :func:`model_map`."""

    def __init__(
        self,
        model: nn.Module,
        model_type: str,
        spec: ArchSpec,
        blocks: list[BlockInfo],
        embedding_names: list[str],
        dims: tuple[int, int, int],
        config: Any,
    ) -> None:
        self.model = model
        self.model_type = model_type
        self.spec = spec
        self.blocks = blocks
        self.embedding_names = embedding_names
        self.n_heads, self.n_kv_heads, self.head_dim = dims
        self.config = config
        self._modules = dict(model.named_modules())
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._attn_cache: dict[str, list[AttentionInfo]] = {}

    def __repr__(self) -> str:
        stacks = sorted({b.stack for b in self.blocks})
        return (
            f"ModelMap({self.model_type!r}, stacks={stacks}, num_layers={self.num_layers}, "
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim})"
        )

    @property
    def stacks(self) -> list[str]:
        """Names of the block stacks in model order (one for decoder-only models)."""
        seen: list[str] = []
        for b in self.blocks:
            if b.stack not in seen:
                seen.append(b.stack)
        return seen

    @property
    def num_layers(self) -> int:
        """Number of blocks per stack (the largest stack for encoder-decoder models)."""
        return max(sum(1 for b in self.blocks if b.stack == s) for s in self.stacks)

    def blocks_at(self, layers: list[int] | None = None) -> list[BlockInfo]:
        """Blocks whose index is in ``layers`` (per stack; all when ``None``)."""
        return [b for b in self.blocks if layers is None or b.index in layers]

    # ------------------------------------------------------------------ attention
    def attention(self, block: BlockInfo) -> list[AttentionInfo]:
        """The attention modules of ``block`` with their Q/K/V/O slices."""
        if block.name not in self._attn_cache:
            infos = []
            for spec in self.spec.attention:
                info = self._resolve_attention(block, spec)
                if info is not None:
                    infos.append(info)
            if not infos:
                raise UnsupportedArchitectureError(
                    f"no attention module found in block {block.name!r} of model_type "
                    f"{self.model_type!r}; pass q=, k=, v=, o= (or qkv= and qkv_layout=) to "
                    "mitigate.model_map"
                )
            self._attn_cache[block.name] = infos
        return self._attn_cache[block.name]

    def _find(self, parent: str, path: Path | None) -> str | None:
        if path is None:
            return None
        for alt in (path,) if isinstance(path, str) else path:
            name = f"{parent}.{alt}" if parent else alt
            if name in self._modules:
                return name
        return None

    def _weight_of(self, module_name: str) -> tuple[str, str | None, nn.Module]:
        """(weight name, bias name, the layer holding them) — unwraps PEFT ``base_layer``."""
        mod = self._modules[module_name]
        owner, owner_name = mod, module_name
        while hasattr(owner, "base_layer") and isinstance(owner.base_layer, nn.Module):
            owner, owner_name = owner.base_layer, f"{owner_name}.base_layer"
        weight = f"{owner_name}.weight"
        if weight not in self._params:
            raise UnsupportedArchitectureError(
                f"module {module_name!r} has no `weight` parameter; pass the projection's module "
                "names to mitigate.model_map (q=, k=, v=, o=, qkv=)"
            )
        bias = f"{owner_name}.bias"
        return weight, bias if bias in self._params else None, owner

    def _lora_of(self, module_name: str) -> tuple[tuple[str, str], ...]:
        mod = self._modules[module_name]
        pairs = []
        lora_a = getattr(mod, "lora_A", None)
        lora_b = getattr(mod, "lora_B", None)
        if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict):
            for adapter in lora_a:
                a, b = f"{module_name}.lora_A.{adapter}.weight", f"{module_name}.lora_B.{adapter}.weight"
                if a in self._params and b in self._params:
                    pairs.append((a, b))
        return tuple(pairs)

    def _slice(self, module_name: str, index: Tensor, *, output: bool, fused: bool) -> ProjectionSlice:
        weight, bias, owner = self._weight_of(module_name)
        conv1d = type(owner).__name__ == "Conv1D"  # HF Conv1D stores (in, out)
        dim = (1 if conv1d else 0) if output else (0 if conv1d else 1)
        size = self._params[weight].shape[dim]
        if int(index.max()) >= size:
            raise UnsupportedArchitectureError(
                f"{weight} has {size} entries along dim {dim} but the layout needs "
                f"{int(index.max()) + 1} (heads={self.n_heads}, kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}); pass n_heads=/n_kv_heads=/head_dim= to mitigate.model_map"
            )
        return ProjectionSlice(
            module_name=module_name,
            param_name=weight,
            dim=dim,
            index=index,
            bias_name=bias if output else None,
            lora=self._lora_of(module_name),
            fused=fused,
        )

    def _resolve_attention(self, block: BlockInfo, spec: AttentionSpec) -> AttentionInfo | None:
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        o_name = self._find(block.name, spec.o)
        per_head = lambda n, start=0: torch.arange(start, start + n * hd).view(n, hd)  # noqa: E731
        if spec.qkv is not None:
            fused = self._find(block.name, spec.qkv)
            if fused is None or o_name is None:
                return self._missing(block, spec)
            layout = spec.layout(self.config) if callable(spec.layout) else spec.layout
            q_idx, k_idx, v_idx = fused_qkv_index(layout, nh, nkv, hd)
            q = self._slice(fused, q_idx, output=True, fused=True)
            k = self._slice(fused, k_idx, output=True, fused=True)
            v = self._slice(fused, v_idx, output=True, fused=True)
        else:
            names = [self._find(block.name, p) for p in (spec.q, spec.k, spec.v)]
            if any(n is None for n in names) or o_name is None:
                return self._missing(block, spec)
            q = self._slice(names[0], per_head(nh), output=True, fused=False)
            k = self._slice(names[1], per_head(nkv), output=True, fused=False)
            v = self._slice(names[2], per_head(nkv), output=True, fused=False)
        o = self._slice(o_name, per_head(nh), output=False, fused=False)
        return AttentionInfo(block=block, kind=spec.kind, q=q, k=k, v=v, o=o)

    def _missing(self, block: BlockInfo, spec: AttentionSpec) -> None:
        if spec.optional:
            return None
        raise UnsupportedArchitectureError(
            f"block {block.name!r} of model_type {self.model_type!r} lacks the attention modules "
            f"{spec}; pass q=, k=, v=, o= (or qkv=, qkv_layout=) to mitigate.model_map"
        )

    # ------------------------------------------------------------------ other modules
    def router_modules(self) -> list[tuple[BlockInfo, str]]:
        """MoE router (gate) modules per block: ``[(block, module_name), ...]``."""
        out = []
        for b in self.blocks:
            name = self._find(b.name, self.spec.router)
            if name is not None:
                out.append((b, name))
        return out

    def mlp_module_names(self, block: BlockInfo) -> list[str]:
        """Full names of the block's FFN / expert container modules."""
        return [n for p in self.spec.mlp if (n := self._find(block.name, p)) is not None]

    def mlp_linear_names(self, block: BlockInfo) -> list[str]:
        """Full names of the ``nn.Linear``/``Conv1D`` layers of the block's FFN (not LoRA parts)."""
        out = []
        for prefix in self.mlp_module_names(block):
            for name, mod in self._modules[prefix].named_modules(prefix=prefix):
                if ".lora_" in name or name.endswith(".base_layer"):
                    continue
                base = getattr(mod, "base_layer", None)  # a PEFT wrapper counts under its own name
                if is_linear(mod) or (isinstance(base, nn.Module) and is_linear(base)):
                    out.append(name)
        return out

    def block_of(self, name: str) -> BlockInfo | None:
        """The block containing the parameter/module ``name`` (parsed on dots, never substring)."""
        for b in self.blocks:
            if name == b.name or name.startswith(b.name + "."):
                return b
        return None

    def param_groups(self) -> dict[str, ParamGroup]:
        """Classify every parameter (tied ones under each name) into :data:`GROUPS`."""
        owners: dict[str, str] = {}  # module name -> group, for attention/router modules
        for b in self.blocks:
            for att in self.attention(b):
                for g, sl in (("q", att.q), ("k", att.k), ("v", att.v), ("o", att.o)):
                    owners[sl.module_name] = "qkv" if sl.fused else g
            for b2, r in self.router_modules():
                if b2 is b:
                    owners[r] = "router"
        mlp_prefixes = {b.name: self.mlp_module_names(b) for b in self.blocks}
        out_emb = None
        get_out = getattr(self.model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out_emb = get_out()
            except (AttributeError, NotImplementedError):
                out_emb = None
        head_names = {n for n, m in self._modules.items() if out_emb is not None and m is out_emb}
        result: dict[str, ParamGroup] = {}
        for name in self._params:
            block = self.block_of(name)
            stack, layer = (block.stack, block.index) if block else (None, None)
            group = None
            for mod_name, g in owners.items():
                if name.startswith(mod_name + "."):
                    group = g
                    break
            if group is None and block is not None:
                if any(name.startswith(p + ".") for p in mlp_prefixes[block.name]):
                    group = "ffn"
            if group is None and any(name == e or name.startswith(e + ".") for e in self.embedding_names):
                group = "embed"
            if group is None and any(name.startswith(h + ".") for h in head_names):
                group = "head"
            if group is None:
                leaf = name.rsplit(".", 2)[-2].lower() if "." in name else name.lower()
                is_norm = any(t in leaf for t in ("norm", "ln", "layernorm"))
                group = "norm" if is_norm else "other"
            result[name] = ParamGroup(group, stack, layer)
        return result


def fused_qkv_index(layout: Layout, n_heads: int, n_kv: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Positions of Q, K and V heads along the output axis of a fused QKV weight.

    Returns:
        ``(q (n_heads, head_dim), k (n_kv, head_dim), v (n_kv, head_dim))`` long tensors.

    Raises:
        ValueError: unknown layout or ``n_heads`` not a multiple of ``n_kv``.
    """
    nh, nkv, hd = n_heads, n_kv, head_dim
    if nkv <= 0 or nh % nkv:
        raise ValueError(f"n_heads={nh} must be a positive multiple of n_kv_heads={nkv}")
    ar = torch.arange
    if layout == "concat":
        q = ar(nh * hd).view(nh, hd)
        k = ar(nh * hd, (nh + nkv) * hd).view(nkv, hd)
        v = ar((nh + nkv) * hd, (nh + 2 * nkv) * hd).view(nkv, hd)
        return q, k, v
    if layout == "grouped":
        g = nh // nkv
        stride = (g + 2) * hd
        head = torch.arange(nh)
        q = ((head // g) * stride + (head % g) * hd)[:, None] + ar(hd)[None, :]
        grp = torch.arange(nkv)
        k = (grp * stride + g * hd)[:, None] + ar(hd)[None, :]
        v = (grp * stride + (g + 1) * hd)[:, None] + ar(hd)[None, :]
        return q, k, v
    raise ValueError(f"unknown fused QKV layout {layout!r}; use 'concat' or 'grouped'")


# ----------------------------------------------------------------------------- resolution


def is_linear(mod: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face ``Conv1D`` (whose weight is stored ``(in, out)``)."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _config_of(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except (TypeError, ValueError):
            return cfg
    return cfg


def _first_attr(cfg: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def _default_dims(cfg: Any) -> tuple[int, int, int]:
    nh = _first_attr(cfg, ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    if nh is None:
        raise UnsupportedArchitectureError(
            "cannot read the number of attention heads from the config; pass n_heads= to mitigate.model_map"
        )
    nkv = _first_attr(cfg, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    if nkv is None:
        nkv = 1 if getattr(cfg, "multi_query", False) is True else nh
    hd = _first_attr(cfg, ("head_dim", "d_kv"))
    if hd is None:
        hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
        if hidden is None:
            raise UnsupportedArchitectureError(
                "cannot read the head dimension from the config; pass head_dim= to mitigate.model_map"
            )
        hd = hidden // nh
    return int(nh), int(nkv), int(hd)


_BLOCK_RX = re.compile(r"^\d+$")
_Q_NAMES = ("q_proj", "query", "q", "wq", "q_lin")
_K_NAMES = ("k_proj", "key", "k", "wk", "k_lin")
_V_NAMES = ("v_proj", "value", "v", "wv", "v_lin")
_O_NAMES = ("o_proj", "out_proj", "dense", "o", "wo", "out_lin", "c_proj")


def _find_stacks(modules: dict[str, nn.Module], suffixes: tuple[str, ...]) -> list[str]:
    """Full names of ModuleLists whose dotted name is or ends with one of ``suffixes``."""
    found = []
    for suffix in suffixes:
        for name, mod in modules.items():
            if isinstance(mod, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
                if name not in found:
                    found.append(name)
    return found


def _generic_spec(model: nn.Module, modules: dict[str, nn.Module]) -> ArchSpec | None:
    """Discover blocks and ``q_proj``/``query``-style names; ``None`` when nothing fits."""
    best: tuple[int, str, AttentionSpec] | None = None
    for name, mod in modules.items():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        first = mod[0]
        rel = {n: m for n, m in first.named_modules() if n}
        def pick(cands: tuple[str, ...], parent: str | None = None) -> str | None:
            for n, m in rel.items():
                leaf = n.rsplit(".", 1)[-1]
                par = n.rsplit(".", 1)[0] if "." in n else ""
                if leaf in cands and is_linear(m) and (parent is None or par == parent):
                    return n
            return None
        q = pick(_Q_NAMES)
        if q is None:
            continue
        parent = q.rsplit(".", 1)[0] if "." in q else ""
        k, v = pick(_K_NAMES, parent), pick(_V_NAMES, parent)
        o = pick(_O_NAMES, parent)
        if o is None:  # BERT-style: output projection in a sibling module
            o = next((n for n in rel if n.rsplit(".", 1)[-1] in _O_NAMES and is_linear(rel[n])
                      and n.startswith(parent.rsplit(".", 1)[0])), None)
        if k is None or v is None or o is None:
            continue
        if best is None or len(mod) > best[0]:
            best = (len(mod), name, AttentionSpec(q=q, k=k, v=v, o=o))
    if best is None:
        return None
    _, stack, att = best
    emb = tuple(
        n for n, m in modules.items()
        if isinstance(m, nn.Embedding) and not n.startswith(stack + ".")
    )
    return ArchSpec(blocks=(stack,), embeddings=emb, attention=(att,), mlp=("mlp", "feed_forward", "ffn"))


def model_map(
    model: nn.Module,
    *,
    blocks: str | tuple[str, ...] | None = None,
    embeddings: tuple[str, ...] | None = None,
    q: str | None = None,
    k: str | None = None,
    v: str | None = None,
    o: str | None = None,
    qkv: str | None = None,
    qkv_layout: Layout | None = None,
    mlp: tuple[str, ...] | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
) -> ModelMap:
    """Resolve where ``model``'s blocks, embeddings and attention projections live.

    Works on Hugging Face models, PEFT-wrapped models and bare base models. The table row is
    chosen by ``model.config.model_type``; unknown types use generic discovery (a ModuleList of
    blocks containing ``q_proj/k_proj/v_proj``- or ``query/key/value``-named linears). Any keyword
    overrides the table (paths relative to a block, except ``blocks``/``embeddings`` which are
    dotted suffixes of module names).

    Args:
        model: the model (``PreTrainedModel``, ``PeftModel``, or any ``nn.Module`` with overrides).
        blocks: block ModuleList suffix(es), e.g. ``"model.layers"``.
        embeddings: embedding module suffixes, e.g. ``("embed_tokens",)``.
        q, k, v, o: projection paths relative to a block, e.g. ``"self_attn.q_proj"``.
        qkv: fused projection path; requires ``qkv_layout`` (``"concat"`` or ``"grouped"``).
        mlp: FFN prefixes relative to a block.
        n_heads, n_kv_heads, head_dim: override what the config says.

    Returns:
        A :class:`ModelMap`.

    Raises:
        UnsupportedArchitectureError: the type is unknown and discovery failed, or an override
            is inconsistent; the message names ``model_type`` and these arguments.
    """
    cfg = _config_of(model)
    model_type = str(getattr(cfg, "model_type", None) or type(model).__name__)
    modules = dict(model.named_modules())
    spec = ARCHITECTURES.get(model_type)
    overrides = any(x is not None for x in (blocks, q, k, v, o, qkv))
    if spec is None and not overrides:
        spec = _generic_spec(model, modules)
        if spec is None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} ({type(model).__name__}) is not in mitigate's architecture "
                f"table (supported: {', '.join(sorted(ARCHITECTURES))}) and no block list with "
                "q_proj/k_proj/v_proj- or query/key/value-named projections was found. Describe it: "
                "mitigate.model_map(model, blocks='model.layers', q='self_attn.q_proj', "
                "k='self_attn.k_proj', v='self_attn.v_proj', o='self_attn.o_proj', "
                "embeddings=('embed_tokens',)) — or qkv='attn.qkv', qkv_layout='concat'|'grouped' "
                "for a fused projection — and pass it as `arch=` to the freezing functions."
            )
    if overrides or embeddings is not None or mlp is not None:
        base = spec or ArchSpec(blocks=(), embeddings=(), attention=(), mlp=())
        attn = base.attention
        if qkv is not None:
            if qkv_layout is None or o is None:
                raise UnsupportedArchitectureError("qkv= needs qkv_layout='concat'|'grouped' and o=")
            attn = (AttentionSpec(qkv=qkv, layout=qkv_layout, o=o),)
        elif any(x is not None for x in (q, k, v, o)):
            if None in (q, k, v, o):
                raise UnsupportedArchitectureError(
                    f"pass all of q=, k=, v=, o= together (got q={q!r}, k={k!r}, v={v!r}, o={o!r})"
                )
            attn = (AttentionSpec(q=q, k=k, v=v, o=o),)
        spec = ArchSpec(
            blocks=(blocks,) if isinstance(blocks, str) else (blocks or base.blocks),
            embeddings=embeddings if embeddings is not None else base.embeddings,
            attention=attn,
            mlp=mlp if mlp is not None else base.mlp,
            router=base.router,
            dims=base.dims,
        )
        if not spec.blocks or not spec.attention:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r}: overrides must give blocks= and the projections "
                "(q=, k=, v=, o= or qkv=, qkv_layout=, o=)"
            )
    assert spec is not None
    stack_names = _find_stacks(modules, spec.blocks)
    if not stack_names:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r}: no nn.ModuleList named {spec.blocks} in {type(model).__name__}; "
            "pass blocks= to mitigate.model_map"
        )
    block_list: list[BlockInfo] = []
    for stack_full in stack_names:
        stack = next(s for s in spec.blocks if stack_full == s or stack_full.endswith("." + s))
        for child_name, child in modules[stack_full].named_children():
            if not _BLOCK_RX.match(child_name):
                continue
            block_list.append(BlockInfo(stack, int(child_name), f"{stack_full}.{child_name}", child))
    emb_names = []
    for suffix in spec.embeddings:
        for name in modules:
            if (name == suffix or name.endswith("." + suffix)) and not any(
                name.startswith(b.name + ".") for b in block_list
            ):
                if name not in emb_names:
                    emb_names.append(name)
    if cfg is not None:
        dims = (spec.dims or _default_dims)(cfg)
    elif None in (n_heads, head_dim):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config; pass n_heads=, n_kv_heads= and head_dim="
        )
    else:
        dims = (n_heads, n_kv_heads or n_heads, head_dim)
    dims = (n_heads or dims[0], n_kv_heads or dims[1], head_dim or dims[2])
    mm = ModelMap(model, model_type, spec, block_list, emb_names, dims, cfg)
    mm.attention(block_list[0])  # fail early with a clear error
    return mm
