"""Dumps, the report and the command line are features: test what they contain."""
import os

import pytest

import zqcompile as zq
from zqcompile.cli.demo import demo_rows
from zqcompile.cli.main import main

from .conftest import engine_for, ids, model_for


def test_report_tables():
    text = engine_for("gpt2", "w8a8").report()
    for section in ("Passes", "GEMMs by precision", "GEMM plan", "Fusions", "Not fused"):
        assert section in text
    assert "transformer.h.1.mlp.c_fc" in text and "zq.int8_gemm_dequant" in text
    assert "fuse_producer_quant" in text and "add+layernorm+quant" in text
    # the GEMM kept in FP and why
    assert "lm_head" in text and "w8a8 role head" in text


def test_dump_writes_every_pass_with_text_and_picture(tmp_path):
    zq.compile(model_for("llama"), (ids(2, 8),), "w8a8", dump_dir=tmp_path / "dump", generation=False)
    files = sorted(os.listdir(tmp_path / "dump"))
    from zqcompile.passes import PIPELINE
    for i, p in enumerate(PIPELINE, start=1):
        assert f"{i:02d}_{p.__name__}.txt" in files and f"{i:02d}_{p.__name__}.html" in files
    assert {"00_captured.txt", "fusions.md", "report.txt", "plan.json"} <= set(files)
    final = (tmp_path / "dump" / f"{len(PIPELINE):02d}_cleanup.txt").read_text()
    assert "zq::int8_gemm_dequant" in final and "model.layers.0.mlp.down_proj" in final
    page = (tmp_path / "dump" / f"{len(PIPELINE):02d}_cleanup.html").read_text()
    assert "<svg" in page and "#7fd17f" in page and "norm_quant" in page  # fused ops in green
    table = (tmp_path / "dump" / "fusions.md").read_text()
    assert "add+rmsnorm+quant" in table and "# Not fused" in table
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".zq-dump")]


def test_dump_to_a_file_path_fails_cleanly(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(OSError, match="is a file"):
        zq.dump(engine_for("bert", "w8a8"), target)
    assert target.read_text() == "x"


def test_cli_compile_report_roundtrip(tmp_path, capsys):
    model = model_for("bert")
    model.save_pretrained(tmp_path / "bert")
    out = tmp_path / "m.zq"
    # --in-memory: the whole model loaded first (a folder streams by default: tests/test_streaming.py)
    assert main(["compile", str(tmp_path / "bert"), "--config", "w8a8", "--out", str(out), "--seq", "16",
                 "--in-memory"]) == 0
    assert out.exists()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("GEMMs by precision") == 2
    assert "streamed" not in text
    assert main(["report", str(tmp_path / "nothing.zq")]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_numbers():
    rows = {(r["model"].split()[0], r["config"]): r for r in demo_rows(families=("gpt2",), configs=("w8a8", "w4/8a8"))}
    assert rows[("gpt2", "w8a8")]["rel_l2_err"] < 0.03 and rows[("gpt2", "w8a8")]["top1_agree"] > 0.97
    assert rows[("gpt2", "w4/8a8")]["rel_l2_err"] > rows[("gpt2", "w8a8")]["rel_l2_err"]
