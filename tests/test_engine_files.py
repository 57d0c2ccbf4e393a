"""Engine files as users meet them: saved in one process and loaded in another, checked for damage, and
written without ever replacing what is not an engine."""
from __future__ import annotations

import json
import os
import random
import stat

import pytest
import torch

import zqcompile as zq
from zqcompile.models import tiny_model

from .conftest import ids, main_output
from .subproc import run_python

# Loads each engine in a process that imported nothing but zqcompile (and torch to save the outputs).
_LOAD_AND_RUN = """
import sys, torch
import zqcompile as zq
for path in sys.argv[1:]:
    e = zq.load(path)
    x = torch.load(path + ".in.pt")
    out = e(x)
    res = {"type": type(out).__module__ + "." + type(out).__qualname__,
           "main": out.logits if hasattr(out, "logits") else out.last_hidden_state}
    if e._generator is not None:
        res["tokens"] = e.generate(x[:1, :5], max_new_tokens=6)
    torch.save(res, path + ".out.pt")
"""


@pytest.fixture(scope="module")
def saved_engines(tmp_path_factory):
    """GPT-2 (ModelOutput with cross attentions), BERT (pooler output), Llama with generation graphs, and an FP8
    Llama (float8_e4m3fn constants)."""
    d = tmp_path_factory.mktemp("engines")
    made = {}
    for name, config, generate in (("gpt2", "w8a8", False), ("bert", "w4/8a8", False), ("llama", "w8a8", True),
                                   ("llama-fp8", "fp8", False)):
        family = name.split("-")[0]
        model = tiny_model(family)
        engine = zq.compile(model, (ids(2, 8),), config, generation=zq.CacheSpec(2, 16) if generate else False)
        x = ids(3, 11, seed=5)
        ref = engine(x)
        tokens = None
        if generate:
            tokens = engine.generate(x[:1, :5], max_new_tokens=6)
        path = d / f"{name}.zq"
        engine.save(path)
        torch.save(x, str(path) + ".in.pt")
        made[name] = (path, type(ref), main_output(ref), tokens)
    return made


def test_engine_loads_runs_and_generates_in_a_fresh_process(saved_engines):
    res = run_python(_LOAD_AND_RUN, *(str(p) for p, *_ in saved_engines.values()))
    assert res.returncode == 0, res.stderr
    for family, (path, out_type, ref, tokens) in saved_engines.items():
        got = torch.load(str(path) + ".out.pt")
        assert got["type"] == f"{out_type.__module__}.{out_type.__qualname__}", family
        assert torch.equal(got["main"], ref), family  # same reference ops, same constants: bit-exact
        if tokens is not None:
            assert torch.equal(got["tokens"], tokens)


def test_flipped_bits_never_load_silently_different(saved_engines, tmp_path):
    path, _, ref, _ = saved_engines["gpt2"]
    data = bytearray(path.read_bytes())
    x = torch.load(str(path) + ".in.pt")
    middle = tmp_path / "middle.zq"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    middle.write_bytes(flipped)
    with pytest.raises(zq.EngineFileError, match=r"middle\.zq.* is damaged: (constant '[^']+'|the \w+ program|the "
                                                 r"metadata) \(archive member '[^']+'\) fails its check"):
        zq.load(middle)
    rng = random.Random(0)
    detected = 0
    for i in range(16):  # anywhere in the file: refused, or (padding, unused header fields) identical outputs
        pos = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / f"f{i}.zq"
        p.write_bytes(flipped)
        try:
            out = main_output(zq.load(p)(x))
        except zq.EngineFileError as e:
            assert str(p) in str(e)
            detected += 1
            continue
        assert torch.equal(out, ref), f"bit flip at byte {pos} of {len(data)} changed the outputs silently"
    assert detected >= 12  # nearly every byte of an engine file is checksummed content


def test_truncated_file_is_refused(saved_engines, tmp_path):
    path = saved_engines["bert"][0]
    short = tmp_path / "short.zq"
    short.write_bytes(path.read_bytes()[: os.path.getsize(path) // 3])
    with pytest.raises(zq.EngineFileError, match="short.zq"):
        zq.load(short)


def _no_temporaries(d) -> None:
    assert not [f for f in os.listdir(d) if f.startswith(".zq-")], os.listdir(d)


def test_save_refuses_what_is_not_an_engine(saved_engines, tmp_path):
    engine = zq.load(saved_engines["gpt2"][0])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.zq"
    link.symlink_to(notes)
    cases = [(tmp_path, "is a directory"), (fifo, "not a regular file"), (notes, "not a zqcompile engine"),
             (link, "symbolic link"), (tmp_path / "no" / "m.zq", "does not exist")]
    for target, why in cases:
        with pytest.raises(zq.OutputPathError, match=why) as e:
            engine.save(target)
        assert repr(str(target)) in str(e.value) and ".tmp" not in str(e.value)
    assert notes.read_text() == "my notes" and stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    _no_temporaries(tmp_path)
    # an earlier engine is replaced, atomically
    again = tmp_path / "again.zq"
    engine.save(again)
    first = again.read_bytes()
    zq.load(saved_engines["bert"][0]).save(again)
    assert again.read_bytes() != first and zq.load(again).record.model == "BertModel"
    _no_temporaries(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_save_into_an_unwritable_place_names_the_users_path():
    e = zq.compile(tiny_model("bert"), (ids(2, 8),), "none")
    with pytest.raises(OSError, match=r"'/proc/xyz'.*not writable") as err:
        e.save("/proc/xyz")
    assert ".zq-" not in str(err.value)


def test_dump_never_deletes_what_it_did_not_write(tmp_path):
    engine = zq.compile(tiny_model("gpt2"), (ids(2, 8),), "w8a8")
    user = tmp_path / "work"
    user.mkdir()
    (user / "train.py").write_text("print('mine')")
    with pytest.raises(zq.OutputPathError, match="not empty and holds no earlier zqcompile dump"):
        zq.dump(engine, user)
    assert os.listdir(user) == ["train.py"]
    d = tmp_path / "dump"
    written = zq.dump(engine, d)
    manifest = json.loads((d / "zqcompile-dump.json").read_text())
    assert sorted(os.listdir(d)) == sorted(manifest["files"]) == sorted(os.path.basename(p) for p in written)
    (d / "my_notes.md").write_text("keep me")  # the user adds a file to an earlier dump
    (d / "report.txt").write_text("stale")
    stale = "99_an_old_pass.txt"  # a file an earlier dump wrote that this one does not
    (d / stale).write_text("old")
    manifest["files"].append(stale)
    (d / "zqcompile-dump.json").write_text(json.dumps(manifest))
    zq.dump(engine, d)
    assert (d / "my_notes.md").read_text() == "keep me"
    assert "GEMM plan" in (d / "report.txt").read_text() and not (d / stale).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    zq.dump(engine, empty)
    assert (empty / "zqcompile-dump.json").exists()
    _no_temporaries(tmp_path)


def test_compile_checks_the_dump_folder_before_capturing(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    import zqcompile.api as api

    def no_capture(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("captured before checking the dump folder")
    monkeypatch.setattr(api, "capture", no_capture)
    with pytest.raises(zq.OutputPathError, match="not empty"):
        zq.compile(tiny_model("bert"), (ids(2, 8),), "w8a8", dump_dir=tmp_path)


def test_example_input_that_is_a_view_gives_a_general_engine():
    """torch.export guards a view input on its base's shape: capture must not hand it the caller's view."""
    model = tiny_model("llama")
    big = ids(2, 40)
    engine = zq.compile(model, (big[:, :8],), "none")
    with torch.no_grad():
        ref = model(big).logits
    assert torch.allclose(engine(big).logits, ref, atol=1e-5, rtol=1e-4)


def test_static_shape_engine_names_the_shape_it_takes(tmp_path):
    import dataclasses
    model = tiny_model("bert")
    engine = zq.compile(model, (ids(2, 8),), dataclasses.replace(zq.get_config("none"), dynamic_seq=False))
    engine.save(tmp_path / "static.zq")
    loaded = zq.load(tmp_path / "static.zq")
    for e in (engine, loaded):
        with pytest.raises(zq.InputError, match="compiled for length 8 only"):
            e(ids(2, 9))
        x = ids(3, 8, seed=2)  # batch stays dynamic
        with torch.no_grad():
            ref = model(x).last_hidden_state
        assert torch.allclose(e(x).last_hidden_state, ref, atol=1e-5)
