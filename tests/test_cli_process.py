"""The `zqcompile` command as users run it: the installed entry point in a subprocess, each command a separate
process (compile, then report and export of the file it wrote), bad input answered in one line before any
long work, Ctrl-C leaving nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zqcompile.models import tiny_model

from .subproc import _env, run_cli, run_python, zqcompile_cmd


def _tokenizer(vocab_size: int):
    """A word-level tokenizer built offline (no hub): words w0..wN, [UNK], [EOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, "[EOS]": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    gpt2 = root / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)  # weights only: no tokenizer
    llama = root / "llama"
    tiny_model("llama").save_pretrained(llama)  # 128 positions, with a tokenizer
    _tokenizer(1000).save_pretrained(llama)
    bad_type = root / "bad_type"
    tiny_model("gpt2").save_pretrained(bad_type)
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps(cfg | {"n_layer": "two"}))
    unknown = root / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt9"}))
    return {"root": root, "gpt2": gpt2, "llama": llama, "bad_type": bad_type, "unknown": unknown}


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


def test_compile_then_report_then_export_each_in_its_own_process(folders, tmp_path):
    out, dump = tmp_path / "m.zq", tmp_path / "dump"
    res = run_cli("compile", folders["gpt2"], "--config", "w8a8", "--out", out, "--dump", dump, "--seq", "16",
                  "--no-generation")  # a saved engine that generates: tests/test_engine_files.py
    assert res.returncode == 0, res.stderr
    assert "saved" in res.stdout and (dump / "zqcompile-dump.json").exists()
    assert "compiling (w8a8)" in res.stderr and "writing the engine" in res.stderr  # progress is shown
    noise = [ln for ln in res.stderr.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith(("compiling", "capturing", "writing", "prefill graph",
                                                  "decode graph", "streaming weights", " "))]
    assert not noise, noise  # nothing but zqcompile's own progress: no library warnings or bars
    rep = run_cli("report", out)
    assert rep.returncode == 0, rep.stderr
    assert "GEMM plan" in rep.stdout and "transformer.h.1.mlp.c_fc" in rep.stdout
    exp = run_cli("export", out, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert exp.returncode == 0, exp.stderr
    # the exported model computes what the engine computes, each loaded in a fresh process
    check = run_python("""
import sys, numpy as np, torch, onnxruntime as ort, zqcompile as zq
x = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
ref = zq.load(sys.argv[1])(x).logits.numpy()
sess = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
print(float(np.abs(got - ref).max() / np.abs(ref).max()))
""", out, tmp_path / "m.onnx")
    assert check.returncode == 0, check.stderr
    assert float(check.stdout.strip()) < 1e-3
    assert _listing(tmp_path) == ["dump", "m.onnx", "m.zq"]


def _cases(folders, tmp_path) -> dict:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    long_prompt = " ".join(f"w{i}" for i in range(120))
    g, l = str(folders["gpt2"]), str(folders["llama"])
    return {
        "bad_field_type": (["compile", folders["bad_type"]], r"config.json: .*'n_layer' expected int"),
        "unknown_model_type": (["compile", folders["unknown"]], r"model_type 'gpt9' is not known"),
        "negative_seq": (["compile", g, "--seq", "-3"], r"--seq: must be >= 1, got -3"),
        "zero_batch": (["compile", g, "--batch", "0"], r"--batch: must be >= 1, got 0"),
        "out_is_dir": (["compile", g, "--out", tmp_path], r"it is a directory; give a file name"),
        "out_dir_missing": (["compile", g, "--out", tmp_path / "no" / "m.zq"], r"does not exist"),
        "out_is_fifo": (["compile", g, "--out", fifo], r"not a regular file"),
        "out_is_user_file": (["compile", g, "--out", notes], r"not a zqcompile engine is there; remove it"),
        "dump_not_empty": (["compile", g, "--dump", busy], r"not empty and holds no earlier zqcompile dump"),
        "unknown_preset": (["compile", g, "--config", "w3a3"], r"unknown preset 'w3a3'; valid presets"),
        "seq_beyond_context": (["compile", g, "--seq", "500"], r"--seq 500 is longer than the model's context"),
        "bad_device": (["compile", g, "--device", "nonsense"], r"--device 'nonsense' is not a device"),
        "generate_zero_tokens": (["generate", l, "--prompt", "w1", "--max-new-tokens", "0"], r"must be >= 1, got 0"),
        "generate_no_tokenizer": (["generate", g, "--prompt", "hi"], r"folder '.*gpt2' has no tokenizer files"),
        "generate_empty_prompt": (["generate", l, "--prompt", ""], r"encodes to no tokens"),
        "generate_prompt_too_long": (["generate", l, "--prompt", long_prompt, "--max-new-tokens", "20"],
                                     r"prompt is 120 tokens .* 140 in all, more than the model's context of 128"),
        "report_not_an_engine": (["report", notes], r"not a readable zqcompile engine"),
        "eval_negative_lkd_clip_lr": (["eval", g, "--lkd", "generated", "--lkd-clip-lr", "-1"],
                                      r"--lkd-clip-lr must be a number >= 0, got -1"),
    }


def _check_untouched(tmp_path) -> None:
    assert (tmp_path / "notes.txt").read_text() == "mine" and _listing(tmp_path / "busy") == ["keep.txt"]
    assert os.path.exists(tmp_path / "fifo") and not [f for f in os.listdir(tmp_path) if f.startswith(".zq-")]


# Each through the installed command (a few seconds of start-up each); the rest through cli.main in-process.
_SUBPROCESS_CASES = ["bad_field_type", "unknown_model_type", "negative_seq", "out_is_user_file", "dump_not_empty",
                     "generate_zero_tokens", "generate_prompt_too_long", "report_not_an_engine"]


@pytest.mark.parametrize("case", _SUBPROCESS_CASES)
def test_bad_input_is_one_line_naming_the_cause(folders, tmp_path, case):
    import re
    args, expect = _cases(folders, tmp_path)[case]
    t0 = time.perf_counter()
    res = run_cli(*args, cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("zqcompile"), res.stderr
    assert re.search(expect, lines[0]), lines[0]
    assert time.perf_counter() - t0 < 60  # before any compile
    _check_untouched(tmp_path)


def test_bad_input_in_process_cases(folders, tmp_path, capsys):
    import re

    from zqcompile.cli.main import main
    cases = _cases(folders, tmp_path)
    for case, (args, expect) in cases.items():
        if case in _SUBPROCESS_CASES:
            continue
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse exits itself
            rc = e.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and re.search(expect, lines[0]), (case, err)
    _check_untouched(tmp_path)


def test_ctrl_c_during_compile_leaves_nothing(folders, tmp_path):
    proc = subprocess.Popen([zqcompile_cmd(), "compile", str(folders["llama"]), "--out", "m.zq", "--dump", "d"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen = ""
    deadline = time.time() + 120
    while "capturing" not in seen and time.time() < deadline:  # interrupt once the long work has begun
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + err
    assert "interrupted; nothing written" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


_INTERRUPT_WHILE_SAVING = """
import sys, zqcompile.runtime.engine as eng
from zqcompile.cli.main import main
real = eng.Engine.write_to
def write_then_interrupt(self, path):
    real(self, path)          # the engine is fully written to its temporary file...
    raise KeyboardInterrupt   # ...and Ctrl-C arrives before the dump is
eng.Engine.write_to = write_then_interrupt
sys.exit(main(["compile", sys.argv[1], "--out", "m.zq", "--dump", "d", "--seq", "8", "--no-generation"]))
"""


def test_ctrl_c_while_writing_keeps_the_earlier_engine_and_adds_nothing(folders, tmp_path):
    import zqcompile as zq
    from zqcompile.models import load_model
    zq.compile(load_model(str(folders["gpt2"])), (torch.randint(0, 1000, (2, 8)),), "none",
               generation=False).save(tmp_path / "m.zq")
    before = (tmp_path / "m.zq").read_bytes()
    res = run_python(_INTERRUPT_WHILE_SAVING, folders["gpt2"], cwd=tmp_path)
    assert res.returncode == 130, res.stderr
    assert "interrupted; nothing written" in res.stderr
    assert _listing(tmp_path) == ["m.zq"] and (tmp_path / "m.zq").read_bytes() == before


@pytest.fixture(scope="module")
def generated(folders):
    """`zqcompile generate` of the tiny Llama, 16 greedy W8A8 tokens: the single-process command and, at the same
    time (each is mostly one compile), `torchrun --nproc-per-node 2 -m zqcompile generate ... --tp 2` (gloo) and
    the command with an int8 KV cache."""
    args = ["generate", str(folders["llama"]), "--config", "w8a8", "--prompt", "w1 w2 w3", "--max-new-tokens", "16"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
    env = _env({"OMP_NUM_THREADS": "1"})  # three processes share the cores
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, cmd in (("single", [zqcompile_cmd(), *args]), ("tp", [*torchrun, "-m", "zqcompile", *args,
                                                                             "--tp", "2"]),
                               ("int8_kv", [zqcompile_cmd(), *args, "--kv-cache", "int8"]))}
    outputs = {name: p.communicate(timeout=400) for name, p in procs.items()}
    return {name: (procs[name].returncode, *outputs[name]) for name in procs}


def test_generate_streams_the_same_tokens_as_the_api(folders, generated):
    code, stdout, stderr = generated["single"]
    assert code == 0, stderr
    import zqcompile as zq
    from zqcompile.models import load_model, load_tokenizer
    model, tok = load_model(str(folders["llama"])), load_tokenizer(str(folders["llama"]))
    x = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    out = zq.compile(model, (x,), "w8a8").generate(x, max_new_tokens=16, eos_token_id=tok.eos_token_id)
    assert stdout.strip() == tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
    assert torch.is_tensor(out)


def test_generate_with_an_int8_kv_cache_streams_the_api_tokens(folders, generated):
    """--kv-cache int8 (it failed with 'take ... a 'int8' KV cache; for ... a 'model' cache' before generate()
    used the engine's own cache): the API engine's tokens with the same cache."""
    code, stdout, stderr = generated["int8_kv"]
    assert code == 0, stderr
    import zqcompile as zq
    from zqcompile.models import load_model, load_tokenizer
    model, tok = load_model(str(folders["llama"])), load_tokenizer(str(folders["llama"]))
    x = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    engine = zq.compile(model, (x,), "w8a8", generation=zq.CacheSpec(1, x.shape[1] + 16, "int8"))
    out = engine.generate(x, max_new_tokens=16, eos_token_id=tok.eos_token_id)
    assert stdout.strip() == tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()


def test_torchrun_tensor_parallel_generate_prints_the_single_process_tokens(generated):
    """Tensor parallelism (tests/test_tensor_parallel.py): the W8A8 engine split over two ranks, each quantizing
    its o_proj / down_proj input on its own K slice, still gives the same 16 greedy tokens; rank 0 alone prints."""
    single, tp = generated["single"], generated["tp"]
    assert tp[0] == 0, tp[2]
    assert len(single[1].split()) == 16 and tp[1] == single[1]
    assert "rank 0 of 2 (gloo, cpu)" in tp[2] and "rank 1 of 2" not in tp[2]
