"""Freezing: which values stay bit-identical under real optimizers, on every architecture."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHS, VOCAB, build, forward, toy_loss

import mitigate
from mitigate.architectures import fused_qkv_index

torch.set_num_threads(1)


def _ids(seed: int = 0, batch: int = 2, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def _train(model, steps: int = 3, opt_cls=torch.optim.AdamW, **opt_kw) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kw = opt_kw or {"lr": 1e-2, "weight_decay": 0.1}
    opt = opt_cls(params, **opt_kw)  # created AFTER freezing, on purpose
    model.train()
    for s in range(steps):
        opt.zero_grad()
        toy_loss(model, _ids(seed=s)).backward()
        opt.step()
    model.eval()


def _rows(model, sl, heads=None) -> torch.Tensor:
    params = dict(model.named_parameters(remove_duplicate=False))
    return params[sl.param_name].detach().index_select(sl.dim, sl.rows(heads)).clone()


def _snapshot(model):
    mm = mitigate.model_map(model)
    snap = {}
    for b in mm.blocks:
        for i, att in enumerate(mm.attention(b)):
            for proj in "qkvo":
                snap[(b.name, i, proj)] = _rows(model, getattr(att, proj))
    return mm, snap


@pytest.mark.parametrize("arch", ARCHS)
def test_qk_frozen_bit_identical_v_o_ffn_move(arch):
    model = build(arch)
    report = mitigate.freeze_attention_qk(model)
    mm, before = _snapshot(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    biases = {}
    for b in mm.blocks:
        for att in mm.attention(b):
            for sl in (att.q, att.k):
                if sl.bias_name:
                    biases[sl.bias_name + str(sl.rows()[0].item())] = (
                        sl.bias_name, sl.rows(), params[sl.bias_name].detach()[sl.rows()].clone())
    ffn = {n: p.detach().clone() for n, p in params.items()
           if mm.param_groups()[n].group == "ffn"}
    _train(model)
    _, after = _snapshot(model)
    for key, value in before.items():
        if key[2] in "qk":
            assert torch.equal(value, after[key]), f"{arch}: {key} moved"
        else:
            assert not torch.equal(value, after[key]), f"{arch}: {key} did not train"
    for name, rows, value in biases.values():
        assert torch.equal(params[name].detach()[rows], value), f"{arch}: bias {name} moved"
    assert any(not torch.equal(v, params[n].detach()) for n, v in ffn.items()), f"{arch}: FFN did not train"
    assert report.num_frozen > 0 and 0 < report.trainable_fraction < 1


def _freeze_block0_except_attention(model, mm):
    """Freeze embeddings and every block-0 parameter outside the Q/K/V projections."""
    keep = set()
    for att in mm.attention(mm.blocks[0]):
        for sl in (att.q, att.k, att.v):
            keep.add(sl.param_name)
            if sl.bias_name:
                keep.add(sl.bias_name)
    b0 = [b.name for b in mm.blocks if b.index == 0]
    for n, p in model.named_parameters(remove_duplicate=False):
        in_b0 = any(n.startswith(x + ".") for x in b0)
        is_emb = any(n.startswith(e + ".") for e in mm.embedding_names)
        if (in_b0 and n not in keep) or is_emb:
            p.requires_grad_(False)


def _layer0_attention(model, ids):
    with torch.no_grad():
        out = forward(model, ids, output_attentions=True)
    att = getattr(out, "attentions", None) or getattr(out, "encoder_attentions")
    return att[0].clone()


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "t5"] + ["t5"])
def test_qk_freeze_keeps_layer0_attention_pattern(arch):
    """Independent of our index tables: with everything feeding layer 0's attention scores frozen
    except the (fused) Q/K/V weights, freezing Q/K must leave the pattern bit-identical."""
    model = build(arch)
    mm = mitigate.model_map(model)
    _freeze_block0_except_attention(model, mm)
    mitigate.freeze_attention_qk(model, layers=[0])
    ids = _ids(seed=99)
    before = _layer0_attention(model, ids)
    vrows = _rows(model, mm.attention(mm.blocks[0])[0].v)
    _train(model)
    assert not torch.equal(vrows, _rows(model, mm.attention(mm.blocks[0])[0].v)), "V did not train"
    assert torch.equal(before, _layer0_attention(model, ids))


HEAD_ARCHS = ["gpt2", "gpt_neox", "bloom", "falcon", "falcon-mq", "falcon-mha", "phi3", "gpt_bigcode",
              "gpt_bigcode-mha", "mpt", "llama", "gemma", "opt", "bert"]


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_single_head_freeze(arch):
    model = build(arch)
    mm = mitigate.model_map(model)
    _freeze_block0_except_attention(model, mm)
    report = mitigate.freeze_attention_qk(model, heads={0: [1]})
    ids = _ids(seed=7)
    before = _layer0_attention(model, ids)
    _train(model, steps=4)
    after = _layer0_attention(model, ids)
    assert torch.equal(before[:, 1], after[:, 1]), f"{arch}: frozen head 1 changed"
    for h in (0, 2, 3):
        assert not torch.equal(before[:, h], after[:, h]), f"{arch}: head {h} did not train"
    if mm.n_kv_heads < mm.n_heads:
        assert any("grouped-query" in n for n in report.notes)


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5, foreach=False)),
        (torch.optim.SGD, dict(lr=1e-1, momentum=0.9, weight_decay=0.1)),
        (torch.optim.RMSprop, dict(lr=1e-2, weight_decay=0.1)),
        (torch.optim.Adagrad, dict(lr=1e-1, weight_decay=0.1)),
        (torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ],
)
def test_fused_slices_hold_under_any_optimizer(opt_cls, kw):
    model = build("gpt_neox")
    mitigate.freeze_attention_qk(model, heads={1: [0, 3]})
    mm, before = _snapshot(model)
    att = mm.attention(mm.blocks[1])[0]
    q_before, q_other = _rows(model, att.q, [0, 3]), _rows(model, att.q, [1, 2])
    _train(model, opt_cls=opt_cls, **kw)
    assert torch.equal(q_before, _rows(model, att.q, [0, 3]))
    assert not torch.equal(q_other, _rows(model, att.q, [1, 2]))


def test_bottom_layers_parse_indices_not_substrings():
    model = build("llama", num_hidden_layers=12)
    report = mitigate.freeze_bottom_layers(model, 2)
    for n, p in model.named_parameters():
        frozen_expected = n.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1."))
        assert p.requires_grad == (not frozen_expected), n
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert (report.num_frozen, report.num_trainable) == (frozen, total - frozen)
    assert "trainable" in str(report)
    report2 = mitigate.freeze_attention_qk(model, layers=[10])
    assert not model.model.layers[10].self_attn.q_proj.weight.requires_grad
    assert model.model.layers[11].self_attn.q_proj.weight.requires_grad
    assert model.model.layers[10].self_attn.v_proj.weight.requires_grad
    report2.undo()
    assert model.model.layers[10].self_attn.q_proj.weight.requires_grad


def test_bottom_layers_training_keeps_frozen_values():
    model = build("gpt2")
    report = mitigate.freeze_bottom_layers(model, 1)
    assert report.tied and "tied" in str(report)  # GPT-2 ties wte and lm_head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    for n, p in model.named_parameters():
        same = torch.equal(before[n], p.detach())
        expect_same = n.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))
        assert same == expect_same, n


def test_encoder_decoder_freezes_each_stack():
    model = build("t5")
    mitigate.freeze_bottom_layers(model, 1, embeddings=False)
    assert not model.encoder.block[0].layer[0].SelfAttention.q.weight.requires_grad
    assert not model.decoder.block[0].layer[1].EncDecAttention.q.weight.requires_grad
    assert model.encoder.block[1].layer[0].SelfAttention.q.weight.requires_grad
    assert model.shared.weight.requires_grad


def test_report_counts_and_undo_for_fused():
    model = build("gpt2")
    total = sum(p.numel() for p in model.parameters())
    report = mitigate.freeze_attention_qk(model)
    per_layer = 2 * 32 * 32 + 2 * 32  # Q and K columns of c_attn (32 in) + their bias entries
    assert report.num_frozen == 2 * per_layer
    assert report.num_trainable == total - 2 * per_layer
    assert "transformer.h.0.attn.c_attn.weight[dim 1: 0:32]" in report.frozen  # Q columns
    assert "transformer.h.0.attn.c_attn.weight[dim 1: 32:64]" in report.frozen  # K columns
    report.undo()
    report.undo()  # idempotent
    mm, before = _snapshot(model)
    _train(model)
    _, after = _snapshot(model)
    assert not torch.equal(before[(mm.blocks[0].name, 0, "q")], after[(mm.blocks[0].name, 0, "q")])


def test_bad_arguments_name_the_value():
    model = build("llama")
    with pytest.raises(ValueError, match="not both"):
        mitigate.freeze_attention_qk(model, layers=[0], heads={0: [0]})
    with pytest.raises(ValueError, match="layer 5"):
        mitigate.freeze_attention_qk(model, layers=[5])
    with pytest.raises(ValueError, match=r"heads\[0\] has \[9\]"):
        mitigate.freeze_attention_qk(model, heads={0: [9]})
    with pytest.raises(ValueError, match="num_layers=3 exceeds"):
        mitigate.freeze_bottom_layers(model, 3)
    with pytest.raises(ValueError, match="num_layers=-1"):
        mitigate.freeze_bottom_layers(model, -1)


class _MysteryConfig:
    model_type = "mystery"
    num_attention_heads = 2
    hidden_size = 8


class _Mystery(torch.nn.Module):
    def __init__(self, with_attention: bool):
        super().__init__()
        self.config = _MysteryConfig()
        self.emb = torch.nn.Embedding(10, 8)
        blocks = []
        for _ in range(3):
            blk = torch.nn.Module()
            if with_attention:
                blk.attn = torch.nn.Module()
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    setattr(blk.attn, name, torch.nn.Linear(8, 8))
            else:
                blk.mix = torch.nn.Linear(8, 8)
            blocks.append(blk)
        self.blocks = torch.nn.ModuleList(blocks)


def test_unsupported_architecture_error_names_type_and_overrides():
    with pytest.raises(mitigate.UnsupportedArchitectureError) as err:
        mitigate.freeze_attention_qk(_Mystery(with_attention=False))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "'mystery'" in msg and "blocks=" in msg and "q=" in msg


def test_generic_discovery_and_overrides():
    model = _Mystery(with_attention=True)
    mm = mitigate.model_map(model)
    assert [b.index for b in mm.blocks] == [0, 1, 2]
    assert mm.attention(mm.blocks[0])[0].q.param_name == "blocks.0.attn.q_proj.weight"
    mitigate.freeze_attention_qk(model, layers=[2])
    assert not model.blocks[2].attn.k_proj.weight.requires_grad
    assert model.blocks[1].attn.k_proj.weight.requires_grad
    # explicit overrides for a model the table does not know
    model2 = _Mystery(with_attention=True)
    mm2 = mitigate.model_map(model2, blocks="blocks", q="attn.q_proj", k="attn.k_proj",
                             v="attn.v_proj", o="attn.o_proj", embeddings=("emb",))
    mitigate.freeze_bottom_layers(model2, 1, arch=mm2)
    assert not model2.emb.weight.requires_grad and not model2.blocks[0].attn.q_proj.weight.requires_grad


def test_peft_lora_separate_projections():
    peft = pytest.importorskip("peft")
    model = build("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    mitigate.freeze_attention_qk(model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad == ("v_proj" in n), n
    v_before = {n: p.detach().clone() for n, p in model.named_parameters() if "v_proj.lora_B" in n}
    _train(model)
    params = dict(model.named_parameters())
    assert all(not torch.equal(v, params[n].detach()) for n, v in v_before.items())


def test_peft_lora_on_fused_qkv_keeps_effective_qk_delta():
    peft = pytest.importorskip("peft")
    model = build("gpt2")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    # make B non-zero so the test can fail: pretend a previous task trained the adapter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    report = mitigate.freeze_attention_qk(model)
    assert any("LoRA" in n for n in report.notes)
    lora = model.base_model.model.transformer.h[0].attn.c_attn
    delta = lambda: (lora.lora_B["default"].weight @ lora.lora_A["default"].weight).detach().clone()  # noqa: E731
    before = delta()
    _train(model)
    after = delta()
    assert torch.equal(before[:64], after[:64])  # Q and K output features
    assert not torch.equal(before[64:], after[64:])  # V keeps training


@settings(max_examples=60, deadline=None)
@given(
    nkv=st.integers(1, 4),
    g=st.integers(1, 4),
    hd=st.integers(1, 5),
    layout=st.sampled_from(["concat", "grouped"]),
)
def test_fused_index_partitions_and_matches_reference_reshape(nkv, g, hd, layout):
    nh = nkv * g
    q, k, v = fused_qkv_index(layout, nh, nkv, hd)
    total = (nh + 2 * nkv) * hd
    allpos = torch.cat([q.flatten(), k.flatten(), v.flatten()]).sort().values
    assert torch.equal(allpos, torch.arange(total))
    pos = torch.arange(total)
    if layout == "grouped":  # the modelling code's own view: (kv groups, g + 2, head_dim)
        grp = rearrange(pos, "(n s d) -> n s d", n=nkv, s=g + 2)
        ref_q = rearrange(grp[:, :g], "n s d -> (n s) d")
        ref_k, ref_v = grp[:, g], grp[:, g + 1]
    else:
        ref_q = rearrange(pos[: nh * hd], "(h d) -> h d", h=nh)
        ref_k = rearrange(pos[nh * hd : (nh + nkv) * hd], "(h d) -> h d", h=nkv)
        ref_v = rearrange(pos[(nh + nkv) * hd :], "(h d) -> h d", h=nkv)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k) and torch.equal(v, ref_v)


# ----------------------------------------------------------------------------- held slices follow loads


def _write_safetensors(model, path):
    from safetensors.torch import save_model
    save_model(model, str(path))


def _load_plain(model, other, tmp_path):
    model.load_state_dict(other.state_dict())


def _load_submodule(model, other, tmp_path):  # on the block, not the top-level model
    model.get_decoder().layers[0].load_state_dict(other.get_decoder().layers[0].state_dict())


def _load_safetensors(model, other, tmp_path):
    from safetensors.torch import load_model
    _write_safetensors(other, tmp_path / "other.safetensors")
    load_model(model, str(tmp_path / "other.safetensors"))


def _load_assign(model, other, tmp_path):  # the parameters are replaced, not written
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)


def _load_copy(model, other, tmp_path):  # in place, bypassing load_state_dict
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)


LOADS = {"load_state_dict": _load_plain, "submodule": _load_submodule, "safetensors": _load_safetensors,
         "assign": _load_assign, "copy_": _load_copy}


@pytest.mark.parametrize(
    "arch,load",
    [(a, ld) for a in ("llama", "gpt2", "gpt_neox") for ld in sorted(LOADS) if ld != "submodule"]
    + [("llama", "submodule")],  # one architecture is enough for a block-level load
)
def test_held_rows_follow_a_weight_load(arch, load, tmp_path):
    """A load after freezing (or a resume) sets the held values: an lr=0 step keeps the loaded
    rows bit-identical, and later steps hold them there."""
    model, other = build(arch), build(arch, seed=1)
    heads = {0: [1], 1: [0, 3]}
    report = mitigate.freeze_attention_qk(model, heads=heads)
    mm = mitigate.model_map(model)
    att0 = mm.attention(mm.blocks[0])[0]
    old = _rows(model, att0.q, [1])
    LOADS[load](model, other, tmp_path)
    assert not torch.equal(old, _rows(other, att0.q, [1]))  # the load changes the held rows
    _train(model, steps=1, lr=0.0)  # lr=0: nothing may move, the held rows least of all
    for b in mm.blocks[: 1 if load == "submodule" else None]:
        for i, att in enumerate(mm.attention(b)):
            for proj in "qk":
                sl = getattr(att, proj)
                assert torch.equal(_rows(model, sl), _rows(other, sl)), f"{arch}/{load}: {b.name} {proj}"
    # and the hold still holds (on the new parameters after assign=True), at the loaded values
    q_held = _rows(model, att0.q, [1])
    _train(model, steps=2)
    assert torch.equal(q_held, _rows(model, att0.q, [1]))
    assert not torch.equal(_rows(other, att0.q, [0]), _rows(model, att0.q, [0]))  # head 0 trains
    report.undo()


# ----------------------------------------------------------------------------- heads= / layers= validation


def _model_state(model):
    """Everything a freezing call may change: flags, gradient hooks, load hooks, held slices."""
    from mitigate.freezing import _REGISTRY
    return (
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: len(p._backward_hooks or {}) for n, p in model.named_parameters()},
        {n: len(m._load_state_dict_post_hooks) for n, m in model.named_modules()},
        sum(len(v) for v in _REGISTRY.values()),
    )


BAD_QK_ARGS = [
    (dict(heads={0: []}), r"heads\[0\]=\[\] must be a non-empty list"),
    (dict(heads={0: 1}), r"heads\[0\]=1 must be a non-empty list"),
    (dict(heads={0: "1"}), r"heads\[0\]='1' must be a non-empty list"),
    (dict(heads={0: [True]}), r"heads\[0\] has \[True\]; heads must be ints in 0\.\.3"),
    (dict(heads={0: [0, -1]}), r"heads\[0\] has \[-1\]"),
    (dict(heads={1: [4]}), r"heads\[1\] has \[4\]"),
    (dict(heads={0: [1.0]}), r"heads\[0\] has \[1\.0\]"),
    (dict(heads={2: [0]}), r"heads has layer 2, but the model has 2 layers"),
    (dict(heads={-3: [0]}), r"heads has layer -3"),
    (dict(heads={"0": [0]}), r"heads has key '0'; keys must be int layer indices"),
    (dict(heads={True: [0]}), r"heads has key True"),
    (dict(heads={0.0: [0]}), r"heads has key 0\.0"),
    (dict(heads={}), r"heads=\{\} must be a non-empty dict"),
    (dict(heads=[0, 1]), r"heads=\[0, 1\] must be a non-empty dict"),
    (dict(layers=0), r"layers=0 must be a non-empty list of int layer indices, e\.g\. layers=\[0, 1\]"),
    (dict(layers=[]), r"layers=\[\] must be a non-empty list"),
    (dict(layers=[True]), r"layers=\[True\] must be"),
    (dict(layers=[0, "1"]), r"layers=\[0, '1'\] must be"),
    (dict(layers=[2]), r"layers contains layer 2, but the model has 2 layers"),
]


@pytest.mark.parametrize("kwargs,match", BAD_QK_ARGS, ids=[repr(k) for k, _ in BAD_QK_ARGS])
def test_bad_heads_and_layers_raise_before_any_change(kwargs, match):
    model = build("llama")
    held = mitigate.freeze_attention_qk(model, heads={1: [2]})  # an earlier freeze stays as it is
    before = _model_state(model)
    with pytest.raises(ValueError, match=match) as err:
        mitigate.freeze_attention_qk(model, **kwargs)
    assert "e.g." in str(err.value) or "layers (0..1" in str(err.value)  # says what to pass
    assert _model_state(model) == before
    held.undo()


def test_heads_naming_one_layer_twice_are_merged():
    model, ref = build("llama"), build("llama")
    report = mitigate.freeze_attention_qk(model, heads={0: [0], -2: [1]})  # -2 is layer 0
    ref_report = mitigate.freeze_attention_qk(ref, heads={0: [0, 1]})
    assert report.frozen == ref_report.frozen
    assert (report.num_frozen, report.num_trainable) == (ref_report.num_frozen, ref_report.num_trainable)
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    _train(model, steps=2)
    assert torch.equal(q[:16], before[:16])  # query heads 0 and 1 (head_dim 8)
    assert not torch.equal(q[16:], before[16:])
    report.undo()
    ref_report.undo()


@settings(max_examples=20, deadline=None)
@given(heads=st.dictionaries(
    st.integers(-2, 1), st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_valid_heads_hold_exactly_those_rows(heads):
    """Tiny Llama: 2 layers, 4 query heads and 2 K heads of head_dim 8; query head h shares K head
    h // 2. After AdamW steps (weight decay moves every free element) exactly the rows of the
    named heads are unchanged, in the named layers only."""
    model = build("llama")
    report = mitigate.freeze_attention_qk(model, heads=heads)
    try:
        want: dict[int, set[int]] = {0: set(), 1: set()}
        for layer, hs in heads.items():
            want[layer % 2].update(hs)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train(model, steps=1)
        for n, p in model.named_parameters():
            moved = (p.detach() != before[n])
            expect = torch.ones_like(moved)
            for layer in (0, 1):
                if n == f"model.layers.{layer}.self_attn.q_proj.weight":
                    for h in want[layer]:
                        expect[8 * h : 8 * h + 8] = False
                if n == f"model.layers.{layer}.self_attn.k_proj.weight":
                    for h in want[layer]:
                        expect[8 * (h // 2) : 8 * (h // 2) + 8] = False
            assert torch.equal(moved, expect), (n, heads)
    finally:
        report.undo()
