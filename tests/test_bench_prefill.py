"""Issue 15's prefill grid (`bench/bench_e2e.py --prefill`): the row order the GPU call relies on, and the CPU
smoke run end to end (a fresh process, as the device call runs it): every engine measured, the simulated OOMs and
budget skips recorded in their rows, the ratios and targets computed from the rows."""
from __future__ import annotations

import json
import subprocess
import sys

from bench import e2e_prefill as P
from tests.subproc import REPO, _env


def test_plan_puts_the_targets_first_and_holds_every_row_once():
    rows = P.plan([*P.BERTS, P.LLAMA], [128, 384], [1, 16, 128], 2048, [1, 4], list(P.DEFAULT_ENGINES))
    assert rows[:4] == [("bert-base", 128, 128, e) for e in ("hf-eager-fp16", "zq-w8a8", "zq-w4/8a8", "compile-fp16")]
    assert rows[4:10] == [(P.LLAMA, 2048, b, e) for e in ("hf-eager-fp16", "zq-w8a8", "zq-fp16") for b in (1, 4)]
    assert rows.index(("bert-base", 128, 128, "compile-max-autotune-fp16")) == 13  # after BERT-large's head rows
    assert len(rows) == len(set(rows)) == 2 * 6 * 5 + 2 * 4  # BERT: 2 models x 6 shapes x 5 engines; 8B: 2 x 4
    assert rows[-1][3] == "compile-max-autotune-fp16"
    with_fp8 = P.plan([*P.BERTS, P.LLAMA], [128, 384], [1, 16, 128], 2048, [1, 4], list(P.ENGINES))
    assert with_fp8[:len(rows)] == rows and len(with_fp8) == len(rows) + 2 * (2 * 6 + 2)  # FP8, fp32-scale W4 last
    assert {r[3] for r in with_fp8[len(rows):]} == {"zq-fp8", "zq-w4/8a8-fp32"}
    assert P.plan(["bert-base"], [128], [1, 128], 2048, [1], ["zq-w8a8"]) == [("bert-base", 128, 128, "zq-w8a8"),
                                                                                 ("bert-base", 128, 1, "zq-w8a8")]


def test_smoke_run_writes_every_engine_errors_skips_and_ratios(tmp_path):
    out = tmp_path / "prefill.json"
    r = subprocess.run([sys.executable, "bench/bench_e2e.py", "--prefill", "--smoke", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    a = res["args"]
    assert [(x["model"], x["seq"], x["batch"], x["engine"]) for x in rows] == P.plan(
        ["bert-base", P.LLAMA], a["seqs"], a["batches"], a["llama_seq"], a["llama_batches"], list(P.DEFAULT_ENGINES))
    assert all({"model", "seq", "batch", "engine", "ms"} <= set(x) for x in rows)
    assert {x["engine"] for x in rows if x["ms"] is not None and x["ms"] > 0} == set(P.DEFAULT_ENGINES)
    by = {(x["model"], x["seq"], x["batch"], x["engine"]): x for x in rows}
    oom = by[(P.LLAMA, 32, 2, "hf-eager-fp16")]
    assert oom["ms"] is None and oom["oom"] and "OutOfMemoryError" in oom["error"]
    built, after = by[(P.LLAMA, 32, 1, "zq-w4/8a8")], by[(P.LLAMA, 32, 2, "zq-w4/8a8")]
    assert "at the build" in built["error"] and after["error"].startswith("engine not built")
    for e in P.COMPILE_MODES:  # smoke budget: one row each, the others skipped with the reason
        mine = [x for x in rows if x["engine"] == e]
        assert [x["ms"] is not None for x in mine] == [True] + [False] * (len(mine) - 1)
        assert all("engine budget" in x["skipped"] for x in mine[1:])
    head = {x["engine"]: x["ms"] for x in rows if (x["seq"], x["batch"]) == (16, 2) and x["model"] == "bert-base"}
    rat = next(x for x in res["ratios"] if (x["model"], x["seq"], x["batch"]) == ("bert-base", 16, 2))
    assert rat["w8a8_vs_hf_eager"] == head["hf-eager-fp16"] / head["zq-w8a8"]
    assert rat["w4_over_w8a8"] == head["zq-w4/8a8"] / head["zq-w8a8"]
    best = min(head[e] for e in P.COMPILE_MODES)
    assert rat["w8a8_vs_best_compile"] == best / head["zq-w8a8"] and head[rat["best_compile"]] == best
    llama = next(x for x in res["ratios"] if (x["model"], x["batch"]) == (P.LLAMA, 1))
    assert llama["w8a8_vs_zq_fp16"] == by[(P.LLAMA, 32, 1, "zq-fp16")]["ms"] / by[(P.LLAMA, 32, 1, "zq-w8a8")]["ms"]
    target = next(t for t in res["targets"] if t["target"] == "bert-base s16 b2 W8A8 vs HF eager")
    assert target["value"] == rat["w8a8_vs_hf_eager"] and target["met"] == (target["value"] >= 2.8)
    table = out.with_suffix(".md").read_text()
    assert table.count("| bert-base | ") == 2 and table.count(f"| {P.LLAMA} | ") == 2 and "Not measured:" in table
