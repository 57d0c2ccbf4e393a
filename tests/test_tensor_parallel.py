"""Tensor parallelism on CPU with gloo, 2 processes, the tiny Llama (4 heads, 2 KV heads): through torchrun,
the Python API's TP engine equals the single-process engine (unquantized: logits within the all-reduce's fp32
rounding, 16 greedy tokens equal, on both ranks), and a rank that stops answering mid-run makes the other fail
with a clear error once the group's timeout has passed (one launch, while this process compiles the reference).
`torchrun ... -m zqcompile generate --tp 2 --config w8a8` printing the single-process command's 16 tokens is in
tests/test_cli_process.py (it shares the single-process run). Then the cheap checks: what cannot be sharded, or
was not launched as asked, is refused in one line before compiling."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zqcompile as zq
from zqcompile.models import tiny_model

from .subproc import REPO, _env, run_cli

TIMEOUT_S = 15  # the fault run's group timeout: it must also cover the ranks' difference in compile time


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The torchrun launch of tests/_tp_ranks.py, while this process compiles the single-process reference."""
    out = tmp_path_factory.mktemp("tp")
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen([*torchrun, str(REPO / "tests" / "_tp_ranks.py"), str(out), str(TIMEOUT_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env({"OMP_NUM_THREADS": "1"}))
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = zq.compile(tiny_model("llama"), (ids,), "none", generation=zq.CacheSpec(2, 64))
    ref_logits, ref_tokens = ref(ids).logits, ref.generate(ids, max_new_tokens=16)
    _, stderr = proc.communicate(timeout=400)
    return {"out": out, "ref_logits": ref_logits, "ref_tokens": ref_tokens, "api": (proc.returncode, stderr, time.time())}


def test_api_tp_engine_equals_the_single_process_engine(runs):
    ranks = [json.loads((runs["out"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(ranks):
        assert res["record"] == f"rank {r} of 2 (gloo, cpu)"
        assert "Tensor parallel: this engine is rank" in res["report"]
        assert res["save_refused"].startswith(f"this engine is rank {r} of 2 (gloo, cpu)'s shard (tensor parallel)")
        logits = torch.tensor(res["logits"])
        assert logits.shape == runs["ref_logits"].shape
        torch.testing.assert_close(logits, runs["ref_logits"], atol=1e-5, rtol=0)
        assert torch.equal(torch.tensor(res["tokens"]), runs["ref_tokens"])
    assert ranks[0]["logits"] == ranks[1]["logits"]  # the all-reduce gives every rank the same sum


def test_a_rank_that_stops_answering_makes_the_other_exit_with_a_clear_error(runs):
    code, err, ended = runs["api"]
    assert code != 0
    assert "tensor parallel: rank 0 of 2: an all-reduce failed: another rank exited or did not answer within the " \
           "process group's timeout" in err, err[-3000:]
    hang = float((runs["out"] / "hang_started").read_text())
    failed = float(re.search(r"rank 0 failed at ([\d.]+)", err).group(1))
    assert TIMEOUT_S * 0.8 <= failed - hang <= TIMEOUT_S + 15, (hang, failed)  # the timeout, not a lucky error
    assert ended - failed < 60  # and the launch ended: nothing was left waiting


def test_a_rank_whose_peer_never_comes_exits_1_in_one_line_after_the_timeout(tmp_path):
    """The installed command launched as rank 0 of 2 by hand, with no rank 1: joining the group gives up after
    --tp-timeout and the command says so in one line (exit 1: not the user's error)."""
    import socket
    from .test_cli_process import _tokenizer
    tiny_model("llama").save_pretrained(tmp_path)
    _tokenizer(1000).save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    res = run_cli("generate", tmp_path, "--config", "none", "--tp", "2", "--tp-timeout", "3", "--prompt", "w1",
                  "--max-new-tokens", "2", env=env, timeout=150)  # a hang fails here
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("zqcompile generate: error: tensor parallel: rank 0 could not join the group of 2 within "
                           "3 s: "), res.stderr
    assert res.stdout == ""


# ---- refused before compiling (no process group needed) --------------------------------------------------------
def test_heads_not_divisible_and_other_models_are_refused_in_one_line():
    with pytest.raises(zq.ConfigError, match=r"^tp=3 does not divide LlamaForCausalLM's attention heads \(4\), KV "
                                             r"heads \(2\) and MLP width \(128\): every rank takes an equal share of the attention heads, "
                                             r"KV heads and MLP width; use tp=2$"):
        zq.compile(tiny_model("llama"), (torch.zeros(1, 4, dtype=torch.long),), "none", tp=zq.TensorParallel(3))
    with pytest.raises(zq.ConfigError, match=r"tensor parallelism shards Llama-style decoder layers .* GPT2LMHeadModel "
                                             r"has 0 such attention"):
        zq.compile(tiny_model("gpt2"), (torch.zeros(1, 4, dtype=torch.long),), "none", tp=zq.TensorParallel(2))
    with pytest.raises(zq.ConfigError, match=r"feature-wise scales \(w8a8-fws\) is not supported"):
        zq.compile(tiny_model("llama"), (torch.zeros(1, 4, dtype=torch.long),), "w8a8-fws", tp=zq.TensorParallel(2))
    with pytest.raises(zq.ConfigError, match="TensorParallel.size must be an integer >= 1"):
        zq.TensorParallel(0)


def test_a_process_not_launched_as_a_rank_is_told_how_to_launch():
    with pytest.raises(zq.ConfigError, match=r"tp=2 (needs 2 processes|but the initialized process group has 1)"):
        zq.compile(tiny_model("llama"), (torch.zeros(1, 4, dtype=torch.long),), "none", tp=zq.TensorParallel(2))
    res = run_cli("generate", "no-such-model", "--tp", "2", "--prompt", "hi")  # asked before the model loads
    assert res.returncode == 2
    assert res.stderr.strip() == ("zqcompile generate: error: tp=2 needs 2 processes, and this one was not launched "
                                  "as a rank (no RANK / WORLD_SIZE in its environment); launch one process per "
                                  "rank, e.g. `torchrun --nproc-per-node 2 -m zqcompile generate ... --tp 2`, or "
                                  "call torch.distributed.init_process_group first")


def test_k_groups_cut_by_the_split_are_refused_naming_the_module():
    """tp=2 halves down_proj's K (128 -> 64) inside the default INT4 K group of 128: classify_gemms refuses before
    any weight is quantized. The rank's model is built as a rank would, without a process group (capture traces
    the all-reduce with its fake implementation)."""
    from zqcompile.capture import capture
    from zqcompile.config import get_config
    from zqcompile.parallel import Rank, shard_model
    from zqcompile.passes import PassContext
    from zqcompile.passes.classify_gemms import classify_gemms
    part, shards = shard_model(tiny_model("llama"), Rank(0, 2, "unused", torch.device("cpu"), "gloo"))
    gm, _ = capture(part, (torch.zeros(1, 4, dtype=torch.long),), None, (True, True))
    with pytest.raises(zq.ConfigError, match=re.escape(
            "tp=2 splits model.layers.0.mlp.down_proj (weight N x K = 64 x 128) along K (row-parallel): each rank's "
            "slice must hold whole groups, but K 0..64 of 128 cuts a K group of 128")):
        classify_gemms(gm, PassContext(get_config("w4/8a8"), weight_shards=shards))
    with pytest.raises(zq.ConfigError, match=r"splits model\.layers\.0\.self_attn\.q_proj .* its per-tensor weight "
                                             r"scale cannot be kept"):
        classify_gemms(gm, PassContext(get_config("ptq-static"), weight_shards=shards))
    classify_gemms(gm, PassContext(get_config("w8a8"), weight_shards=shards))  # per-row scales split cleanly
