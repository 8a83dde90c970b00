"""benchmarks/tune.py: hyperparameters chosen on tuning seeds and tuning people, applied by
compare.py --tuned, which refuses to report on the seeds it tuned on."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compare as C
from benchmarks import methods as M
from benchmarks import tune as T


def test_choose_follows_the_stated_rule():
    c = [{"task0_final": 0.9, "plasticity_gain": 0.1}, {"task0_final": 0.6, "plasticity_gain": 0.5},
         {"task0_final": 0.7, "plasticity_gain": 0.46}, {"task0_final": 0.2, "plasticity_gain": 0.6}]
    assert T.choose(c, seq_gain=0.5) == 2  # gain >= 0.45: candidates 1, 2, 3; best Task 0 is 2
    assert T.choose(c, seq_gain=1.0) == 3  # nobody reaches 0.9: the highest gain


def test_every_grid_fits_the_budget_and_holds_its_default():
    for name in T.GRIDS:
        assert 1 <= len(T.grid(name)) <= T.BUDGET
    assert T.grid("seq") == [{}]
    T.GRIDS["_bad"] = [{"fraction": 0.9}]
    try:
        with pytest.raises(ValueError):
            T.grid("_bad")
    finally:
        T.GRIDS.pop("_bad")


def test_every_grid_binds_on_the_default_preset():
    layout = T.Layout.of_biography("default")
    assert layout == T.Layout(num_layers=4, batches_per_task=(134, 44, 44, 44))
    for name in T.GRIDS:
        effs = [e for e, same in T.check_binding(name, layout, strict=True)]
        assert len({json.dumps(e, sort_keys=True) for e in effs}) == len(T.grid(name))
    held = [e["memory_held"] for e, _ in T.check_binding("agem", layout)]
    assert held == [8, 16, 24, 64]
    assert [e["directions_held"] for e, _ in T.check_binding("ogd", layout)] == [[4] * 3, [8] * 3, [16] * 3, [32] * 3]


def test_effective_finds_configurations_that_run_the_same(monkeypatch):
    layout = T.Layout.of_biography("default")
    def eff(name, **hp):
        return T.effective(name, C._method_hp(M.get(name), {f"{name}.{k}": v for k, v in hp.items()}), layout)
    # the grids of the 2026-12 tuning run: these points never bound
    assert eff("agem", memory_size=32) == eff("agem", memory_size=64) == eff("agem", memory_size=128)
    assert eff("agem", memory_size=32)["memory_held"] == 24  # 8 batches offered x 3 finished tasks
    assert eff("agem", memory_size=16) != eff("agem", memory_size=32)
    assert eff("ogd", directions_per_task=8) == eff("ogd", directions_per_task=32)  # 8 batches: 8 directions
    assert eff("ogd", directions_per_task=32, consolidate_batches=32)["basis"] == 96
    assert eff("freeze-bottom", layers=0.75) == eff("freeze-bottom", layers=1.0) == eff("freeze-bottom", layers=3)
    assert eff("replay", fraction=0.1) != eff("replay", fraction=0.25)
    monkeypatch.setitem(T.GRIDS, "agem", [{}, {"memory_size": 128}])
    assert [same for _, same in T.check_binding("agem", layout)] == [None, 0]
    with pytest.raises(ValueError, match=r"\{'memory_size': 128\} runs the same as \{\}"):
        T.check_binding("agem", layout, strict=True)


def test_merge_keeps_the_other_methods_and_refuses_other_runs():
    base = {"scenario": "biography", "preset": "default", "tuning_seeds": [1000, 1001], "evaluated_on": "x",
            "rule": "r", "budget": 4, "seq": {"task0_final": 0.1, "plasticity_gain": 0.7}, "wall_s": 10.0,
            "methods": {"ewc": {"hp": {"scale": 0.01}}, "agem": {"hp": {"memory_size": 16}}}}
    new = {**base, "methods": {"agem": {"hp": {"memory_size": 64}}}, "wall_s": 5.0, "layout": {"num_layers": 4}}
    out = T.merge(base, new)
    assert out["methods"] == {"ewc": {"hp": {"scale": 0.01}}, "agem": {"hp": {"memory_size": 64}}}
    assert out["wall_s"] == 15.0 and out["merged"] == [{"methods": ["agem"], "wall_s": 5.0}]
    with pytest.raises(ValueError, match="tuning_seeds is \\[1000\\] in the new record"):
        T.merge(base, {**new, "tuning_seeds": [1000]})
    with pytest.raises(ValueError, match="seq's plasticity_gain differs"):
        T.merge(base, {**new, "seq": {"task0_final": 0.1, "plasticity_gain": 0.71}})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    torch.set_num_threads(1)
    rec = T.main(["--preset", "micro", "--methods", "seq,replay,ogd", "--seeds", "1",
                  "--out", str(root / "tuned.json"), "--cache-dir", str(root / "cache"), "--workers", "1"])
    return root, rec


def test_tuning_scores_the_tuning_people_on_tuning_seeds(tuned):
    root, rec = tuned
    assert rec["tuning_seeds"] == [T.DEFAULT_TUNING_SEED] and rec["scenario"] == "biography"
    cands = rec["methods"]["replay"]["candidates"]
    assert [c["hp"] for c in cands] == T.grid("replay")
    k = rec["methods"]["replay"]["chosen"]
    assert k == T.choose(cands, rec["seq"]["plasticity_gain"]) and rec["methods"]["replay"]["hp"] == cands[k]["hp"]
    assert json.loads((root / "tuned.json").read_text())["methods"]["replay"]["chosen"] == k
    # a tuning run scores the tuning items (never the test items)
    cfg = C.BenchConfig(preset="micro", methods=["seq"], seed_base=T.DEFAULT_TUNING_SEED, evaluate_on="tune",
                        cache_dir=str(root / "cache"), workers=1, ref_every=0, plots=False)
    res = C.run_benchmark(cfg)
    d = C.describe(cfg)["tasks"]
    assert [len(x) for x in res["methods"]["seq"]["seeds"][0]["final_items"]] == [t["tune_items"] for t in d]
    assert all(t["tune_items"] > 0 and t["eval_items"] > 0 for t in d)
    assert res["seed_roles"] == {"tuning": [T.DEFAULT_TUNING_SEED]} and res["tuning"] is None


def test_a_configuration_that_runs_the_same_is_not_run_again(tuned):
    root, rec = tuned
    layout = T.Layout.of_biography("micro")
    built = C.load_scenario("biography", "micro", str(root / "cache"), T.DEFAULT_TUNING_SEED)
    assert layout.batches_per_task == tuple(len(t.train) for t in built.tasks)
    assert layout.num_layers == built.model_factory().config.num_hidden_layers
    cands = rec["methods"]["ogd"]["candidates"]
    # micro: 6 Task-0 batches, so 8, 16 and 32 directions all store 6
    assert [c.get("same_as") for c in cands] == [None, None, 1, 1]
    assert [c["effective"]["directions_held"] for c in cands] == [[4], [6], [6], [6]]
    assert cands[2]["task0_final"] == cands[1]["task0_final"] and cands[3]["hp"] == T.grid("ogd")[3]
    assert rec["layout"] == {"num_layers": 2, "batches_per_task": [6, 12]}


def test_compare_applies_the_choice_and_refuses_tuning_seeds(tuned):
    root, rec = tuned
    base = dict(preset="micro", methods=["seq", "replay"], cache_dir=str(root / "cache"), workers=1,
                ref_every=0, plots=False, tuned=str(root / "tuned.json"))
    res = C.run_benchmark(C.BenchConfig(**base))
    chosen = rec["methods"]["replay"]["hp"]["fraction"]
    assert res["methods"]["replay"]["hyperparameters"]["fraction"] == chosen
    ogd = rec["methods"]["ogd"]["hp"]
    assert res["tuning"]["applied"] == {"replay.fraction": chosen, **{f"ogd.{k}": v for k, v in ogd.items()}}
    assert res["seed_roles"] == {"test": [0]}
    # an explicit --hp wins over the tuned value
    res = C.run_benchmark(C.BenchConfig(**base, hp={"replay.fraction": 0.123}))
    assert res["methods"]["replay"]["hyperparameters"]["fraction"] == 0.123
    with pytest.raises(ValueError, match=r"seeds \[1000\] were used to tune"):
        C.run_benchmark(C.BenchConfig(**{**base, "methods": ["seq"]}, seed_base=T.DEFAULT_TUNING_SEED))
    with pytest.raises(ValueError, match="tuned on biography/micro, not biography/quick"):
        T.load_tuned(root / "tuned.json", "biography", "quick")


def test_show_renders_every_configuration_and_marks_the_choice(tuned, capsys):
    root, rec = tuned
    T.main(["--show", str(root / "tuned.json")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| replay |")]
    assert len(rows) == len(T.grid("replay"))
    k = rec["methods"]["replay"]["chosen"]
    assert [r.endswith("| yes |") for r in rows] == [i == k for i in range(len(rows))]
    c = rec["methods"]["replay"]["candidates"][k]
    assert f"{c['task0_final'] * 100:.1f} %" in rows[k] and f"{c['plasticity_gain']:.3f}" in rows[k]


def test_merge_refuses_another_setting_before_running_anything(tmp_path):
    rec = {**T.header(C.BenchConfig(preset="micro", seeds=1, seed_base=T.DEFAULT_TUNING_SEED)),
           "seq": {"task0_final": 0.1, "plasticity_gain": 0.5}, "methods": {}}
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({**rec, "budget": 3}))
    with pytest.raises(ValueError, match="budget is 4 in the new record and 3 in the old one"):
        T.main(["--preset", "micro", "--methods", "seq", "--seeds", "1", "--merge", str(bad),
                "--cache-dir", str(tmp_path / "never-built")])
    assert not (tmp_path / "never-built").exists()  # refused before any scenario was built
