"""bench/accuracy/run.py's options for the GPU call (issue 14 item 3): --time-budget-s skips a row whose last
time of its kind no longer fits, --device / --rows are checked when parsed, and the result files list the skips."""
from __future__ import annotations

import json

import pytest
import torch

from bench.accuracy.run import RowBudget, _write, parse_args


def test_row_budget_skips_a_row_whose_last_time_of_its_kind_no_longer_fits():
    b = RowBudget(100.0, start=0.0)
    assert b.skip_reason(lkd=True, now=10.0) is None  # nothing measured yet: starts while time is left
    b.done(False, 30.0)
    assert "30 s needed, 20 s left" in b.skip_reason(lkd=True, now=80.0)  # at least a row without LKD's time
    b.done(True, 60.0)
    assert b.skip_reason(lkd=True, now=30.0) is None  # 60 s needed, 70 left
    assert "60 s needed, 50 s left" in b.skip_reason(lkd=True, now=50.0)
    assert b.skip_reason(lkd=False, now=50.0) is None  # the other kind: 30 s
    b.done(False, 5.0)
    assert b.skip_reason(lkd=False, now=94.0) is None
    assert b.skip_reason(lkd=False, now=96.0) is not None
    assert RowBudget(100.0, start=0.0).skip_reason(lkd=False, now=100.0) is not None  # budget spent
    assert RowBudget(None, start=0.0).skip_reason(lkd=True, now=1e9) is None


def test_parse_args_checks_device_and_rows():
    a = parse_args(["--path", "engine", "--rows", "fp32,w4/8a8 + LKD(text)", "--time-budget-s", "50"])
    assert (a.device, a.rows, a.time_budget_s, a.max_eval_tokens) == (torch.device("cpu"),
                                                                     ["fp32", "w4/8a8 + LKD(text)"], 50.0, None)
    with pytest.raises(SystemExit):
        parse_args(["--rows", "fp32,w4/8a9"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])


def test_result_files_keep_rows_and_skips(tmp_path):
    result = {"model": "m", "path": "engine", "eval_text": "t", "eval_tokens": 10, "window": 8, "device": "cpu",
              "dtype": "float32", "torch": torch.__version__, "rows": [{"row": "fp32", "ppl": 20.0}],
              "skipped": [{"row": "w4/8a8 + LKD(text)", "reason": "time budget: ~60 s needed, 5 s left"}]}
    _write(tmp_path, result)
    assert json.loads((tmp_path / "accuracy_engine.json").read_text())["skipped"] == result["skipped"]
    md = (tmp_path / "accuracy_engine.md").read_text()
    assert "| fp32 | 20.00 | +0.0% |" in md and "w4/8a8 + LKD(text) | skipped: time budget" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_engine.json", "accuracy_engine.md"]
