"""benchmarks/recovery_control.py: the later tasks it builds are what its docstring says, and a run
reports every condition (micro preset, seconds)."""

from __future__ import annotations

import torch

from benchmarks import biography as B
from benchmarks import recovery_control as R


def test_format_shift_changes_only_the_answer_format(tmp_path):
    cfg = B.resolve_config("micro")
    data = B.generate_data(cfg, 0)
    codec = B.WordCodec(B.build_tokenizer())
    the = codec.ids(R.PREFIX)[0]
    shift = R.later_task("format shift", cfg, codec, data, 0)
    rows = [(ids[lab != -100].tolist(), ids[: int((lab != -100).nonzero()[0])].tolist())
            for b in shift for ids, lab in zip(b["input_ids"], b["labels"])]
    known = {tuple(codec.qa_example(*B.qa_pair(p, a))[0][:-len(codec.ids(p.value(a))) - 1])
             for p in data.qa_split(0)[0] for a in B.ATTRIBUTES}
    assert len(rows) == len(data.qa_split(0)[0]) * len(B.ATTRIBUTES)
    for answer, prompt in rows:
        assert answer[0] == the and answer[-1] == codec.eos_id  # "the <value>" and the end
        assert tuple(t for t in prompt if t != codec.pad_id) in known  # Task 0's own questions
    plain = [b for b in R.later_task("new people", cfg, codec, data, 0)]
    both = [b for b in R.later_task("new people, new format", cfg, codec, data, 0)]
    assert sum(int(b["input_ids"].shape[0]) for b in plain) == sum(int(b["input_ids"].shape[0]) for b in both)
    first = lambda bs: [int(ids[lab != -100][0]) for b in bs for ids, lab in zip(b["input_ids"], b["labels"])]
    assert the not in first(plain) and the in first(both)


def test_a_run_reports_every_condition(tmp_path):
    torch.set_num_threads(1)
    rows = R.main(["--preset", "micro", "--seeds", "0", "--steps", "4", "--recovery-steps", "2",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")])
    assert [r["condition"] for r in rows] == list(R.CONDITIONS)
    for r in rows:
        assert 0.0 <= r["task0_after"] <= 1.0 and 0.0 <= r["task0_after_new_format"] <= 1.0
        assert abs(r["probe_gain"] - (r["task0_after_probe"] - r["task0_after"])) < 1e-12
    assert (tmp_path / "r.json").exists()
