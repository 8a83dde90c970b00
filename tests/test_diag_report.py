"""λ_max through the engine, the end-to-end report on tiny models, and the CLI on saved checkpoints."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, build
from torch import nn

import mitigate.diagnostics as D
from mitigate.diagnose import main

torch.set_num_threads(1)

CURV = {"params": r"model\.norm\.weight", "max_iter": 4, "tol": 1e-2}


def test_exports_are_sorted_and_resolve():
    assert D.__all__ == sorted(D.__all__)
    for name in D.__all__:
        assert getattr(D, name) is not None
    assert callable(D.report)
    from mitigate.curvature import EigenResult, hessian_eigenvalues

    assert D.hessian_eigenvalues is hessian_eigenvalues and D.EigenResult is EigenResult


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5]))


def test_lambda_max_matches_the_explicit_hessian_and_ratio():
    torch.manual_seed(0)
    a = torch.randn(3, 3, dtype=torch.float64)
    h = (a @ a.T + torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))).float()

    def loss_fn(model, batch):
        w = model.w
        return batch["scale"] * (0.5 * w @ h @ w + torch.sin(w).sum())

    model = Quadratic()
    batch = {"scale": 1.0}
    full = torch.autograd.functional.hessian(lambda w: loss_fn(type("M", (), {"w": w})(), batch), model.w.detach())
    expected = float(torch.linalg.eigvalsh(full.double())[-1])
    rep = D.lambda_max(model, [batch], loss_fn, k=1, max_iter=3, tol=1e-6)
    assert rep.lambda_max == pytest.approx(expected, rel=1e-4)
    assert rep.ratio_to_reference is None
    half = D.lambda_max(model, [{"scale": 0.5}], loss_fn, reference=rep, max_iter=3, tol=1e-6)
    assert half.ratio_to_reference == pytest.approx(0.5, rel=1e-4)
    assert D.lambda_max(model, [batch], loss_fn, reference=2 * expected, max_iter=3, tol=1e-6).ratio_to_reference == pytest.approx(0.5, rel=1e-4)


def _batches(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (2, 8), generator=g)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _finetuned(model, batches, steps=3):
    after = copy.deepcopy(model)
    opt = torch.optim.AdamW(after.parameters(), lr=1e-2)
    after.train()
    for s in range(steps):
        opt.zero_grad()
        after(**batches[s % len(batches)]).loss.backward()
        opt.step()
    return after.eval()


def test_report_end_to_end(tmp_path):
    before = build("llama")
    old, new = _batches(0), _batches(1)
    after = _finetuned(before, new)
    state = {n: p.detach().clone() for n, p in before.named_parameters()}
    rep = D.report(before, after, old_batches=old, new_batches=new, out_dir=tmp_path, curvature_kwargs=CURV)
    for name in ("report.json", "summary.md", "cka_per_layer.png", "head_entropy_change.png", "gradient_cosine.png", "lambda_max.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == rep
    assert len(rep["cka"]["per_layer"]) == 3 and rep["heads"]["fraction"] >= 0
    assert set(rep["alignment"]["per_group"]) >= {"q", "k", "v", "o", "ffn"}
    assert rep["curvature"]["ratio"] == pytest.approx(rep["curvature"]["after"]["lambda_max"] / rep["curvature"]["before"]["lambda_max"])
    assert rep["weights"]["global"] > 0 and "router" not in rep
    summary = (tmp_path / "summary.md").read_text()
    assert "15–23%" in summary and "0.32–0.47" in summary and "−75%" in summary and "67%" in summary
    assert all(torch.equal(p, state[n]) for n, p in before.named_parameters())
    assert all(p.grad is None for p in before.parameters())


def test_report_on_moe_without_plots_or_new_data(tmp_path):
    before = build("mixtral")
    old = _batches(0, n=1)
    after = _finetuned(before, old, steps=2)
    rep = D.report(before, after, old_batches=old, out_dir=tmp_path, curvature=False, plots=False)
    assert len(rep["router"]["kl_per_layer"]) == 2
    assert "alignment" not in rep and "curvature" not in rep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "summary.md"]


def test_report_skips_attention_sections_under_sdpa(tmp_path):
    before = build("llama")
    before.set_attn_implementation("sdpa")
    rep = D.report(before, copy.deepcopy(before), old_batches=_batches(0, n=1), out_dir=tmp_path, curvature=False, plots=False)
    assert "eager" in rep["heads"]["skipped"]
    assert rep["cka"]["per_layer"] == pytest.approx([1.0, 1.0, 1.0])


def test_missing_matplotlib_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model = build("llama")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        D.report(model, model, old_batches=_batches(0, n=1), out_dir=tmp_path)


def _save_checkpoints(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    before = build("gpt2")
    after = _finetuned(before, _batches(3))
    before.save_pretrained(tmp_path / "before")
    fast.save_pretrained(tmp_path / "before")
    after.save_pretrained(tmp_path / "after")
    data = tmp_path / "old.jsonl"
    lines = [json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90}" for j in range(6 + i % 3))}) for i in range(5)]
    lines.append(json.dumps({"input_ids": [3, 4, 5, 6, 7]}))
    data.write_text("\n".join(lines) + "\n")
    return data


def test_cli_on_saved_checkpoints(tmp_path):
    data = _save_checkpoints(tmp_path)
    out = tmp_path / "diag"
    args = ["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--data", str(data)]
    assert main([*args, "--new-data", str(data), "--out", str(out), "--batch-size", "4", "--no-curvature"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model_type"] == "gpt2" and rep["cka"]["n_tokens"] == sum(6 + i % 3 for i in range(5)) + 5
    assert rep["alignment"]["global_cosine"] == pytest.approx(1.0, abs=1e-6)  # same data on both sides
    assert (out / "cka_per_layer.png").exists() and (out / "summary.md").exists()
    with pytest.raises(ValueError, match="not a folder"):
        main(["--before", str(tmp_path / "nope"), "--after", str(tmp_path / "after"), "--data", str(data), "--out", str(out)])


def test_cli_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "mitigate.diagnose", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--before" in res.stdout and "--data" in res.stdout


def test_cli_prompt_answer_rows_take_the_answer_only_loss_and_lambda_max_agrees_with_the_engine(tmp_path, caplog):
    import logging

    from mitigate.curvature import hessian_eigenvalues
    from mitigate.diagnose import load_jsonl_batches
    from transformers import AutoModelForCausalLM

    _save_checkpoints(tmp_path)
    rows = [{"prompt": [2 + i, 10 + i, 20 + i, 30 + i], "answer": [40 + i, 50 + i]} for i in range(6)]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (b,) = load_jsonl_batches(str(data), None, batch_size=8, max_length=5, max_examples=64)
    # cut from the left to max_length 5: the last 3 prompt tokens, then the 2 answer tokens
    assert b["input_ids"][1].tolist() == [11, 21, 31, 41, 51]
    assert b["labels"][1].tolist() == [-100, -100, -100, 41, 51]
    with pytest.raises(ValueError, match="both 'prompt' and 'answer'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": [1, 2]}) + "\n")
        load_jsonl_batches(str(bad), None, batch_size=8, max_length=8, max_examples=8)

    out = tmp_path / "diag"
    caplog.set_level(logging.INFO)
    args = ["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--data", str(data)]
    assert main([*args, "--new-data", str(data), "--out", str(out), "--batch-size", "3", "--curvature-iters", "8"]) == 0
    assert not [r for r in caplog.records if r.name.startswith("matplotlib")]  # the CLI keeps them quiet
    assert (out / "gradient_cosine.png").exists() and (out / "lambda_max.png").exists()
    rep = json.loads((out / "report.json").read_text())

    # the engine on the same model with an explicitly answer-only loss (cross-entropy on the two
    # answer tokens of each row, predicted from the positions before them)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "before", attn_implementation="eager")
    ids = torch.tensor([r["prompt"] + r["answer"] for r in rows])
    qa = [{"input_ids": ids[i : i + 3]} for i in (0, 3)]

    def answer_only(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, -3:-1]  # predict tokens 4 and 5
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, -2:].reshape(-1))

    engine = hessian_eigenvalues(before, qa, answer_only, max_iter=8)
    every_token = hessian_eigenvalues(before, [{"input_ids": x["input_ids"], "labels": x["input_ids"]} for x in qa], max_iter=8)
    lam = rep["curvature"]["before"]["lambda_max"]
    # same Hessian, same Lanczos start (seed 0): equal up to float32 summation order
    assert lam == pytest.approx(float(engine.values[0]), rel=1e-4)
    assert abs(lam - float(every_token.values[0])) > 1e-2 * abs(lam)  # the all-token loss is another landscape


def test_report_and_plan_use_token_normalised_cka_where_one_massive_token_saturates_plain_cka(tmp_path, monkeypatch):
    from mitigate.diagnostics import layerwise_cka
    from mitigate.planning import diagnose

    def spiked(seed):  # one "massive activation": 1e4 on channel 0 of the first token, in both models
        m = build("llama", seed=seed)

        def hook(_mod, _inp, out):
            out = out.clone()
            out[:, 0, 0] += 1e4
            return out

        m.get_input_embeddings().register_forward_hook(hook)
        return m

    before, after = spiked(0), spiked(1)
    old = _batches(0, n=2)
    with pytest.warns(UserWarning, match="plain CKA saturates"):  # the saturation rule fires
        plain = layerwise_cka(before, after, old).per_layer
    normed = layerwise_cka(before, after, old, token_norm=True).per_layer
    # the residual stream carries the spike through every block (the last hidden state is after the
    # final RMSNorm, which removes it): plain CKA saturates there, token-normalised CKA does not
    assert float(plain[:-1].min()) > 0.99 and float(normed[1:-1].max()) < 0.9
    rep = D.report(before, after, old_batches=old, out_dir=tmp_path, curvature=False, plots=False)
    assert rep["cka"]["token_norm"] is True
    assert rep["cka"]["per_layer"] == pytest.approx(normed.tolist(), rel=1e-9)
    assert rep["cka"]["saturated_layers"] == []
    with pytest.warns(UserWarning, match="plain CKA saturates"):
        rep = D.report(before, after, old_batches=old, out_dir=tmp_path, curvature=False, plots=False, cka_token_norm=False)
    assert rep["cka"]["per_layer"] == pytest.approx(plain.tolist(), rel=1e-9)
    assert rep["cka"]["saturated_layers"] == [0, 1] and min(rep["cka"]["outlier_share"][:2]) >= 0.5

    seen = []
    real = layerwise_cka

    def recording(*a, **k):
        seen.append(k.get("token_norm", False))
        return real(*a, **k)

    monkeypatch.setattr(D, "layerwise_cka", recording)
    diagnose(before, old, old, probe_steps=1, lr=1e-3)
    assert seen == [True]
