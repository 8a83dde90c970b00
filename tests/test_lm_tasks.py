"""compare.py --model DIR --tasks ...: your own causal LM and task files (benchmarks/lm_tasks.py)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compare as C
from benchmarks import lm_tasks as L

WORDS = [f"w{i}" for i in range(40)] + ["is", "the", "capital", "of", "what", "?", "."]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer saved with save_pretrained (what a user has)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")
    cfg = AutoConfig.for_model("llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    old = [{"prompt": f"what is w{i} ?", "answer": f"w{(7 * i + 3) % 40}"} for i in range(20)]
    new = [{"prompt": f"the capital of w{i} is", "answer": f"w{(11 * i + 5) % 40} ."} for i in range(20)]
    text = [{"text": " ".join(f"w{(i * j) % 40}" for j in range(6))} for i in range(10)]
    general = [{"text": " ".join(f"w{(3 * i + j) % 40}" for j in range(8))} for i in range(6)]
    return (_write(d / "old.jsonl", old), _write(d / "new.jsonl", new), _write(d / "text.jsonl", text),
            _write(d / "general.jsonl", general))


def test_read_rows_and_their_errors(tmp_path):
    kind, rows = L.read_jsonl_task(_write(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "a"}] * 2))
    assert kind == "qa" and rows == [("p", "a")] * 2
    kind, rows = L.read_jsonl_task(_write(tmp_path / "t.jsonl", [{"text": "x y"}]))
    assert kind == "text" and rows == ["x y"]
    cases = {
        "mixes": [{"prompt": "p", "answer": "a"}, {"text": "t"}],
        "b.jsonl:2: keys": [{"text": "t"}, {"question": "q"}],
        "non-empty string answer": [{"prompt": "p", "answer": ""}],
        "text=''": [{"text": ""}],
    }
    for i, (msg, rows) in enumerate(cases.items()):
        path = _write(tmp_path / ("b.jsonl" if "b.jsonl" in msg else f"c{i}.jsonl"), rows)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            L.read_jsonl_task(path)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        L.read_jsonl_task(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        L.read_jsonl_task(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        L.read_jsonl_task(tmp_path / "nope.jsonl")


def test_split_is_seeded_disjoint_and_keeps_one_of_each():
    rows = list(range(10))
    tr, ev = L.split_rows(rows, 0.2, seed=3)
    assert len(ev) == 2 and sorted(tr + ev) == rows and not set(tr) & set(ev)
    assert L.split_rows(rows, 0.2, seed=3) == (tr, ev) and L.split_rows(rows, 0.2, seed=4) != (tr, ev)
    assert [len(x) for x in L.split_rows([1, 2], 0.9, 0)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2"):
        L.split_rows([1], 0.5, 0)
    with pytest.raises(ValueError, match="eval_fraction=1.0"):
        L.split_rows(rows, 1.0, 0)


def test_codec_puts_the_loss_on_the_answer(model_dir):
    from transformers import AutoTokenizer

    codec = L.PlainCodec(AutoTokenizer.from_pretrained(model_dir), max_length=8)
    ids, labels = codec.example("what is w1 ?", "w2")
    assert len(ids) == 6 and labels == [-100] * 4 + [ids[4], codec.end_id] and ids[-1] == codec.end_id
    assert codec.text_example("w1 w2 w3") == (ids2 := codec.encode("w1 w2 w3"), ids2)
    with pytest.raises(ValueError, match="max_length=8"):
        codec.example("what is the capital of w1 ?", "w2 w3")


def test_describe_reads_the_files_without_the_model(task_files, capsys):
    old, new, text, general = task_files
    assert C.main(["--model", "/nonexistent", "--tasks", old, new, text, "--describe"]) is None
    d = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in d["tasks"]] == ["old", "new", "text"]
    assert [t["kind"] for t in d["tasks"]] == ["qa", "qa", "text"]
    assert [t["eval_items"] for t in d["tasks"]] == [4, 4, 2]  # 20 % of 20, 20 and 10 rows
    assert d["scenario"] == "lm" and d["steps_per_task"] >= 1


def test_config_refuses_half_an_lm_run():
    with pytest.raises(ValueError, match="--model DIR and --tasks"):
        C.BenchConfig(scenario="lm")
    with pytest.raises(ValueError, match="1 file"):
        C.BenchConfig(scenario="lm", model="m", tasks=["a.jsonl"])


def test_end_to_end_on_your_own_model(model_dir, task_files, tmp_path):
    old, new, text, general = task_files
    res = C.main(["--model", model_dir, "--tasks", old, new, text, "--general", general,
                  "--preset", "micro", "--methods", "seq,ewc,replay", "--workers", "1",
                  "--steps-per-task", "3", "--task0-steps", "6", "--lr", "3e-3", "--out", str(tmp_path),
                  "--run", "own", "--cache-dir", str(tmp_path / "cache"), "--no-plots", "--strict",
                  "--ref-every", "0"])
    assert res["scenario"]["name"] == "lm" and res["scenario"]["tasks"] == ["old", "new", "text"]
    assert [t["eval_items"] for t in res["tasks"]] == [4, 4, 2]
    for name in ("seq", "ewc", "replay"):
        entry = res["methods"][name]
        assert entry["status"] == "ok", entry["message"]
        rec = entry["seeds"][0]
        assert len(rec["acc_matrix"]) == 3 and all(0 <= a <= 1 for row in rec["acc_matrix"] for a in row)
        items = rec["final_items"]
        assert [len(x) for x in items[:2]] == [4, 4] and items[2] is None  # text: no exact match
        assert rec["extra_evals"]["general_nll"] > 0 and 0 <= rec["extra_evals"]["general_top1"] <= 1
    assert {r["method"] for r in res["comparisons"] if r["baseline"] == "seq"} == {"ewc", "replay"}
    cfg = json.loads((tmp_path / "own" / "results.json").read_text())["scenario"]["config"]
    assert cfg["tasks"][0]["digest"] == L.file_digest(old) and cfg["model"]["parameters"] > 0
    assert "Paired differences" in (tmp_path / "own" / "summary.md").read_text()
