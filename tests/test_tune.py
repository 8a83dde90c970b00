"""benchmarks/tune.py: hyperparameters chosen on tuning seeds and tuning people, applied by
compare.py --tuned, which refuses to report on the seeds it tuned on."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compare as C
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


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    torch.set_num_threads(1)
    rec = T.main(["--preset", "micro", "--methods", "seq,replay", "--seeds", "1",
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


def test_compare_applies_the_choice_and_refuses_tuning_seeds(tuned):
    root, rec = tuned
    base = dict(preset="micro", methods=["seq", "replay"], cache_dir=str(root / "cache"), workers=1,
                ref_every=0, plots=False, tuned=str(root / "tuned.json"))
    res = C.run_benchmark(C.BenchConfig(**base))
    chosen = rec["methods"]["replay"]["hp"]["fraction"]
    assert res["methods"]["replay"]["hyperparameters"]["fraction"] == chosen
    assert res["tuning"]["applied"] == {"replay.fraction": chosen} and res["seed_roles"] == {"test": [0]}
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
