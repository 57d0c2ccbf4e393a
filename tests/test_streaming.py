"""Streamed compiles (zq.compile_folder, `zqcompile compile DIR`): a safetensors folder compiled block by block
gives the in-memory compile's engine bit for bit (every quantized weight and scale, logits, greedy tokens),
reads each tensor of the folder once, in block order, with no more than about one block's float weights
alive at a time, and refuses up front what it cannot stream."""
from __future__ import annotations

import re
import weakref

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import zqcompile as zq
from zqcompile.checkpoint import SafetensorsFolder
from zqcompile.errors import ConfigError, InputError, ModelLoadError, WeightError
from zqcompile.models import load_model, tiny_model

from .conftest import ids, main_output
from .subproc import run_cli, run_python

_BLOCK = re.compile(r"model\.layers\.(\d+)\.")
_GEMM_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")


def _constants(engine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every graph (the weight store), by graph and name."""
    out = {}
    for gname, g in zip(("model", "prefill", "decode"), engine.graphs):
        out.update({f"{gname}:{n}": t for n, t in [*g.named_parameters(), *g.named_buffers()]})
    return out


def _assert_same_engine(streamed, in_memory, x) -> None:
    a, b = _constants(streamed), _constants(in_memory)
    assert sorted(a) == sorted(b)
    differ = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    assert not differ, differ[:5]
    assert sum(n.endswith("_wq") for n in a) > 0  # quantized weights were compared, not just float ones
    assert torch.equal(main_output(streamed(x)), main_output(in_memory(x)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama4")
    tiny_model("llama", layers=4).save_pretrained(d)
    return d


def _example(folder):
    """The example inputs `zqcompile compile` makes (batch 2, 32 tokens): the CLI test compares with these."""
    from zqcompile.cli.compile import example_ids
    from zqcompile.models import read_config
    return example_ids(read_config(str(folder)), 2, 32)


@pytest.fixture(scope="module")
def llama_in_memory(llama_dir):
    """The in-memory compile of the folder (load_model, then zq.compile), as the CLI's --in-memory does it."""
    return zq.compile(load_model(str(llama_dir)), (_example(llama_dir),), "w8a8", generation=zq.CacheSpec(2, 32))


class _Loads:
    """SafetensorsFolder.load instrumented: what was read, in order, and at every read how many bytes of the
    blocks' GEMM weights read earlier were still alive (weak references: alive means someone holds them)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        self.alive_gemm_bytes: list[int] = []
        self.alive_blocks: list[set[int]] = []
        self._refs: list[tuple[str, weakref.ref, int]] = []
        real = SafetensorsFolder.load

        def load(folder, name, device, dtype=None):
            t = real(folder, name, device, dtype)
            self.names.append(name)
            if _GEMM_WEIGHT.match(name):
                self._refs.append((name, weakref.ref(t), t.numel() * t.element_size()))
            alive = [(n, b) for n, r, b in self._refs if r() is not None]
            self.alive_gemm_bytes.append(sum(b for _, b in alive))
            self.alive_blocks.append({int(_BLOCK.match(n).group(1)) for n, _ in alive})
            return t
        monkeypatch.setattr(SafetensorsFolder, "load", load)


def test_streamed_llama_equals_the_in_memory_compile_and_holds_one_block_at_a_time(llama_dir, llama_in_memory,
                                                                                  monkeypatch):
    loads = _Loads(monkeypatch)
    streamed = zq.compile_folder(llama_dir, (_example(llama_dir),), "w8a8", generation=zq.CacheSpec(2, 32))
    in_memory = llama_in_memory
    _assert_same_engine(streamed, in_memory, ids(3, 11, seed=5))
    prompt = ids(2, 5, seed=7)
    assert torch.equal(streamed.generate(prompt, max_new_tokens=8), in_memory.generate(prompt, max_new_tokens=8))

    folder = SafetensorsFolder(str(llama_dir))
    assert sorted(loads.names) == sorted(folder.files)  # every tensor of the folder read once
    blocks = [int(m.group(1)) for m in map(_BLOCK.match, loads.names) if m]
    assert blocks == sorted(blocks)  # block by block
    block_gemm = sum(4 * torch.Size(s).numel() for n, s in folder.shapes.items()
                     if _GEMM_WEIGHT.match(n) and n.startswith("model.layers.0."))  # fp32 bytes
    assert max(len(b) for b in loads.alive_blocks) == 1  # the previous block was dropped before the next loaded
    assert max(loads.alive_gemm_bytes) == block_gemm  # never more than one block's GEMM weights (4 in the folder)
    m = streamed.record.memory
    assert m["stream_blocks"] == 4 and m["stream_largest_block_bytes"] >= block_gemm
    # loaded + derived (q/k/v and gate/up concatenated) float tensors alive at once, beside the engine
    assert block_gemm < m["stream_peak_transient_bytes"] <= 2 * m["stream_largest_block_bytes"]
    assert "streamed from the folder block by block (4 transformer blocks" in streamed.report()


@pytest.mark.parametrize("family,config", [("gpt2", "w8a8"), ("bert", "w4/8a8"), ("gemma3", "w8a8"),
                                           ("qwen2", "fp8")])
def test_streamed_other_families_equal_the_in_memory_compile(family, config, tmp_path):
    """GPT-2: Conv1D weights transposed by recipe, biases, the head tied to the embedding; BERT: an encoder
    with INT4 K-groups; Gemma 3: (1 + w) norms folded by recipe; Qwen2 with FP8 weights. The engine owns its
    float weights: rewriting the folder afterwards changes nothing (on the CPU safetensors reads a tensor as a
    view of the mapped file)."""
    tiny_model(family).save_pretrained(tmp_path)
    x = ids(2, 8)
    streamed = zq.compile_folder(tmp_path, (x,), config, generation=False)
    in_memory = zq.compile(load_model(str(tmp_path)), (x,), config, generation=False)
    _assert_same_engine(streamed, in_memory, ids(3, 11, seed=5))
    before = main_output(streamed(x))
    file = tmp_path / "model.safetensors"
    rewritten = save({k: v + 1 for k, v in load_file(file).items()}, metadata={"format": "pt"})
    with open(file, "r+b") as f:  # in place, as another writer would
        f.write(rewritten)
    assert torch.equal(main_output(streamed(x)), before)


def test_moe_checkpoints_saved_per_expert_say_to_load_the_model(tmp_path):
    """transformers saves Mixtral's stacked experts one by one (w1/w2/w3) and converts them on load; a streamed
    compile reads tensors by the model's own names, so it says what to do instead."""
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"experts.gate_up_proj.*MoE experts saved one by one.*--in-memory"):
        zq.compile_folder(tmp_path, (ids(2, 8),), "w8a8", generation=False)


def test_what_cannot_stream_is_refused_before_anything_is_read(tmp_path):
    for preset, why in (("w8a8-fws", "feature-wise scales"), ("ptq-static", "static activation ranges")):
        with pytest.raises(ConfigError, match=f"{why}.*load the model and call zq.compile"):
            zq.compile_folder(tmp_path / "no-such-folder", (ids(2, 8),), preset)  # nothing there to read
    with pytest.raises(InputError, match=r"got the path .* call zq.compile_folder"):
        zq.compile(str(tmp_path), (ids(2, 8),))
    with pytest.raises(InputError, match="dtype must be a floating torch.dtype"):
        zq.compile_folder(tmp_path, (ids(2, 8),), dtype=torch.int8)


def test_a_folder_that_does_not_match_its_config_or_holds_nan_is_named(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    weights = load_file(src / "model.safetensors")
    for case, edit, error, pattern in (
            ("missing", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), ModelLoadError,
             r"no tensor for parameter\(s\) model\.layers\.1\.mlp\.up_proj\.weight"),
            ("shape", lambda w: w.update({"model.norm.weight": torch.ones(3)}), ModelLoadError,
             r"'model\.norm\.weight' has shape \[3\]; config\.json makes it \[64\]"),
            ("nan", lambda w: w["model.layers.1.self_attn.k_proj.weight"].__setitem__((0, 0), float("nan")),
             WeightError, r"'model\.layers\.1\.self_attn\.k_proj\.weight' has 1 NaN/Inf")):
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        w = {k: v.clone() for k, v in weights.items()}
        edit(w)
        save_file(w, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(error, match=pattern):
            zq.compile_folder(d, (ids(2, 8),), "w8a8", generation=False)


_LOAD_AND_RUN = """
import sys, torch, zqcompile as zq
e = zq.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save({"logits": e(x).logits, "tokens": e.generate(x[:, :5], max_new_tokens=6)}, sys.argv[3])
"""


def test_cli_streams_a_folder_and_its_engine_equals_the_in_memory_one_in_a_fresh_process(llama_dir, llama_in_memory,
                                                                                        tmp_path):
    res = run_cli("compile", llama_dir, "--config", "w8a8", "-o", tmp_path / "out.zq", "--max-batch", "2",
                  "--max-cache-len", "32")
    assert res.returncode == 0, res.stderr
    assert "compiled in" in res.stdout and "(streamed block by block from the folder)" in res.stdout
    ref = llama_in_memory
    x = ids(2, 9, seed=3)
    torch.save(x, tmp_path / "x.pt")
    run = run_python(_LOAD_AND_RUN, tmp_path / "out.zq", tmp_path / "x.pt", tmp_path / "got.pt")
    assert run.returncode == 0, run.stderr
    got = torch.load(tmp_path / "got.pt")
    assert torch.equal(got["logits"], ref(x).logits)
    assert torch.equal(got["tokens"], ref.generate(x[:, :5], max_new_tokens=6))
