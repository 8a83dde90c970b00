"""The biography scenario: generator, tokenizer, evaluation and cached, seeded construction."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest
import torch

from benchmarks import biography as B

MICRO = B.PRESETS["micro"]


def test_people_are_unique_across_populations():
    cfg = replace(MICRO, population=40, num_new_tasks=3)
    data = B.generate_data(cfg, seed=3)
    names = [p.name for pop in data.populations for p in pop]
    assert len(names) == 40 * 4
    assert len(set(names)) == len(names)


def test_generate_people_refuses_when_names_run_out():
    used = {f"{f} {s}" for f in B.FIRST_NAMES for s in B.LAST_NAMES}
    used.discard("anna smith")
    assert [p.name for p in B.generate_people(1, random.Random(0), used)] == ["anna smith"]
    with pytest.raises(ValueError, match="unused full names"):
        B.generate_people(1, random.Random(0), used)


def test_every_attribute_has_three_templates_and_each_is_used():
    assert set(B.BIO_TEMPLATES) == set(B.ATTRIBUTES) == set(B.QA_TEMPLATES)
    cfg = replace(MICRO, population=40, bios_per_person=3)
    data = B.generate_data(cfg, seed=0)
    for attr, templates in B.BIO_TEMPLATES.items():
        assert len(templates) >= 3, attr
        for template in templates:
            used = any(
                template.format(name=p.name, value=p.value(attr)) in bio
                for pop, bios in zip(data.populations, data.bios)
                for i, p in enumerate(pop)
                for bio in bios[i * cfg.bios_per_person : (i + 1) * cfg.bios_per_person]
            )
            assert used, f"template never used: {template!r}"


def test_biography_states_every_attribute_once_in_shuffled_order():
    data = B.generate_data(replace(MICRO, population=20), seed=1)
    person = data.populations[0][0]
    rendered = {t.format(name=person.name, value=person.value(a)): a
                for a in B.ATTRIBUTES for t in B.BIO_TEMPLATES[a]}
    orders = set()
    for seed in range(20):
        bio = B.biography(person, random.Random(seed))
        sentences = [s.strip() + " ." for s in bio.split(" .") if s.strip()]
        assert all(s in rendered for s in sentences), sentences
        order = tuple(rendered[s] for s in sentences)
        assert sorted(order) == sorted(B.ATTRIBUTES)  # each attribute exactly once
        orders.add(order)
    assert len(orders) > 1  # sentence order is shuffled
    assert all(person.name in b for b in data.bios[0][: MICRO.bios_per_person])


def test_splits_are_disjoint_and_deterministic():
    cfg = replace(MICRO, population=20, num_new_tasks=2)
    data = B.generate_data(cfg, seed=5)
    for t in range(3):
        train, held_out = data.qa_split(t)
        assert {p.name for p in train}.isdisjoint({p.name for p in held_out})
        assert len(train) == len(held_out) == 10
    again = B.generate_data(cfg, seed=5)
    assert again.to_json() == data.to_json()
    other = B.generate_data(cfg, seed=6)
    assert other.to_json() != data.to_json()
    # population 0 does not depend on the settings of later tasks
    fewer = B.generate_data(replace(cfg, num_new_tasks=1, new_population=8), seed=5)
    assert fewer.to_json()["populations"][0] == data.to_json()["populations"][0]
    assert fewer.bios[0] == data.bios[0]


def test_tokenizer_covers_everything_in_few_tokens():
    codec = B.WordCodec(B.build_tokenizer())
    values = B.CITIES + B.UNIVERSITIES + B.MAJORS + B.COMPANIES + ["march 5 , 1972"]
    for v in values:
        assert 1 <= len(codec.ids(v)) <= (4 if "," in v else 3), v
    for name in (f"{f} {s}" for f in B.FIRST_NAMES[:5] for s in B.LAST_NAMES[:5]):
        assert len(codec.ids(name)) == 2
    with pytest.raises(ValueError, match="out-of-vocabulary"):
        codec.ids("zorblax")
    assert codec.vocab_size < 600


def test_qa_labels_cover_only_the_answer_and_eos():
    codec = B.WordCodec(B.build_tokenizer())
    person = B.generate_data(MICRO, 0).populations[0][0]
    prompt, answer = B.qa_pair(person, "university")
    ids, labels = codec.qa_example(prompt, answer)
    n_answer = len(codec.ids(answer))
    assert labels[-1] == codec.eos_id
    assert labels[-1 - n_answer : -1] == ids[-1 - n_answer : -1] == codec.ids(answer)
    assert set(labels[: -1 - n_answer]) == {-100}
    batch = codec.collate([(ids, labels), ([codec.bos_id, 7], [-100, 7])])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)
    assert (batch["labels"][1, 2:] == -100).all()


def _greedy_exact(model, codec, prompt_ids, answer_ids):
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(len(answer_ids)):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out == answer_ids, out[0] == answer_ids[0]


def test_teacher_forced_accuracy_equals_greedy_decoding():
    codec = B.WordCodec(B.build_tokenizer())
    model = B.build_model(MICRO, codec.vocab_size, seed=0).eval()
    people = B.generate_data(MICRO, 0).populations[0][:4]
    # make some answers right: bias the head towards the answer tokens of person 0
    with torch.no_grad():
        for a in B.ATTRIBUTES:
            for tok in codec.ids(people[0].value(a)):
                model.lm_head.weight[tok] += 0.5 * torch.randn(MICRO.hidden_size)
    examples = [(B.qa_pair(p, a), p) for p in people for a in B.ATTRIBUTES]
    exact = first = 0
    for (prompt, answer), _ in examples:
        e, f = _greedy_exact(model, codec, [codec.bos_id, *codec.ids(prompt)], codec.ids(answer))
        exact += e
        first += f
    batches = codec.batches([codec.qa_example(*qa) for qa, _ in examples], 5)
    r = B.answer_accuracy(model, batches, codec.eos_id)
    assert r["exact"] == r["accuracy"] == exact / len(examples)
    assert r["first_token"] == first / len(examples)
    assert not model.training


def test_config_validation():
    with pytest.raises(ValueError, match="population=7"):
        B.BiographyConfig(population=7)
    with pytest.raises(ValueError, match="unique"):
        B.BiographyConfig(population=3000, num_new_tasks=1)
    with pytest.raises(ValueError, match="unknown biography preset"):
        B.resolve_config("huge")


def test_build_scenario_is_cached_and_reproducible(tmp_path):
    a = B.build_scenario("micro", tmp_path, seed=0)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert any(f.startswith("biography-pretrained-") and f.endswith(".safetensors") for f in files)
    assert {"data.json", "tokenizer.json"} <= set(files)
    mtime = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    b = B.build_scenario("micro", tmp_path, seed=0)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == mtime  # reused
    ma, mb = a.model_factory(), b.model_factory()
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert ma.config._attn_implementation == "eager"
    assert not ma.config.tie_word_embeddings
    assert len(a.tasks) == MICRO.num_new_tasks + 1
    for ta, tb in zip(a.tasks, b.tasks):
        for x, y in zip(ta.train, tb.train):
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask", "labels"))
        assert ta.evaluate(ma) == tb.evaluate(mb)
        assert 0 < sum(int(bt["input_ids"].shape[0]) for bt in ta.recovery) <= MICRO.recovery_examples
    # a fresh pretraining from scratch in another directory gives the same weights
    c = B.build_scenario("micro", tmp_path / "other", seed=0).model_factory()
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), c.parameters()))
    d = B.build_scenario("micro", tmp_path, seed=1).model_factory()
    assert not all(torch.equal(p, q) for p, q in zip(ma.parameters(), d.parameters()))


def test_task0_trains_on_one_half_and_evaluates_on_the_other(tmp_path):
    sc = B.build_scenario("micro", tmp_path, seed=0)
    cfg = B.PRESETS["micro"]
    data = B.generate_data(cfg, 0)
    codec = B.WordCodec(B.build_tokenizer())
    train_people, eval_people = data.qa_split(0)

    def names_in(batches):
        text = " ".join(codec.tok.decode(row.tolist()) for b in batches for row in b["input_ids"])
        return {p.name for p in data.populations[0] if re.search(rf"\b{p.name}\b", text)}

    assert names_in(sc.tasks[0].train) == {p.name for p in train_people}
    assert names_in(sc.tasks[0].probe) <= {p.name for p in eval_people}
    assert names_in(sc.tasks[0].recovery) <= {p.name for p in train_people}
    # tasks >= 1 mix biographies (loss on every token) and QA (loss on the answer only)
    labelled = torch.cat([(b["labels"] != -100).sum(1) for b in sc.tasks[1].train])
    lengths = torch.cat([b["attention_mask"].sum(1) for b in sc.tasks[1].train])
    assert (labelled == lengths - 1).any() or (labelled == lengths).any()  # a biography
    assert (labelled < lengths // 2).any()  # a QA example


def test_mixed_task0_is_trained_by_the_scenario_on_bios_and_half_the_qa(tmp_path):
    cfg = replace(MICRO, task0_mix=True, task0_steps=6, pretrain_steps=0, qa_fraction=0.5)
    sc = B.build_scenario(cfg, tmp_path, seed=0)
    assert sc.first_task_pretrained  # the harness gets a model that already knows Task 0
    data = B.generate_data(cfg, 0)
    codec = B.WordCodec(B.build_tokenizer())
    train_people, eval_people = data.qa_split(0)
    rows = [row for b in sc.tasks[0].train for row in zip(b["input_ids"], b["labels"])]
    is_qa = [bool(lab[0] == -100) for _, lab in rows]  # QA: the prompt (from bos on) is unlabelled
    qa_text = " ".join(codec.tok.decode(ids.tolist()) for (ids, _), q in zip(rows, is_qa) if q)
    bio_text = " ".join(codec.tok.decode(ids.tolist()) for (ids, _), q in zip(rows, is_qa) if not q)
    in_qa = {p.name for p in data.populations[0] if re.search(rf"\b{p.name}\b", qa_text)}
    in_bios = {p.name for p in data.populations[0] if re.search(rf"\b{p.name}\b", bio_text)}
    assert in_qa == {p.name for p in train_people}  # QA of the first half only
    assert in_bios == {p.name for p in data.populations[0]}  # everyone's biographies
    n_qa = sum(is_qa)
    # qa_fraction 0.5: as many QA examples as biographies, each of both at least once
    assert n_qa == len(rows) - n_qa == max(len(data.bios[0]), len(train_people) * len(B.ATTRIBUTES))
    assert B.describe(cfg)["tasks"][0]["train_examples"] == len(rows)
    # the checkpoint holds Task 0: it depends on Task 0's steps, and differs from the init
    assert cfg.pretrain_key(0) != replace(cfg, task0_steps=7).pretrain_key(0)
    assert MICRO.pretrain_key(0) == replace(MICRO, task0_steps=7).pretrain_key(0)
    init = B.build_model(cfg, codec.vocab_size, 0)
    trained = sc.model_factory()
    assert not all(torch.equal(p, q) for p, q in zip(init.parameters(), trained.parameters()))
    with pytest.raises(ValueError, match="task0_steps=0"):
        replace(cfg, task0_steps=0)


def test_default_preset_scores_what_issue_14_asks():
    d = B.describe("default")
    task0, *later = d["tasks"]
    assert task0["eval_items"] >= 600 and task0["tune_items"] > 0
    assert len(later) >= 3 and all(t["eval_items"] >= 200 and t["tune_items"] > 0 for t in later)
    assert sum(t["eval_items"] for t in later) >= 600
    # v1 keeps the earlier default, so its tables stay reproducible
    v1 = B.PRESETS["v1"]
    assert (v1.population, v1.new_population, v1.num_new_tasks, v1.pretrain_steps, v1.task0_mix) == (100, 50, 2, 1500, False)


def test_lowlr_preset_is_the_default_at_a_tenth_of_the_lr():
    from dataclasses import asdict

    low, default = B.PRESETS["lowlr"], B.PRESETS["default"]
    diff = {k: (v, asdict(default)[k]) for k, v in asdict(low).items() if v != asdict(default)[k]}
    assert diff == {"lr": (1e-4, 1e-3)}
    # the same Task 0: its cached model is shared, so only the later tasks differ
    assert low.pretrain_key(0) == default.pretrain_key(0) and low.key(0) != default.key(0)
