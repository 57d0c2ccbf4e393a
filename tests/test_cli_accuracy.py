import argparse
import json

import pytest

from zqcompile.cli.eval import add_eval_command
from zqcompile.cli.inspect_ranges import add_inspect_command

from ._tiny import tiny_gpt2


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path / "m"
    tiny_gpt2().save_pretrained(d)
    vocab = {w: i for i, w in enumerate(["[UNK]", *"abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    return d, text


def _parse(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    add_eval_command(sub)
    add_inspect_command(sub)
    return ap.parse_args(argv)


def test_eval_cli_on_a_folder(gpt2_dir, tmp_path):
    d, text = gpt2_dir
    out = tmp_path / "r.json"
    args = _parse(["eval", str(d), "--config", "w4/8a8", "--text", str(text), "--window", "32",
                   "--lkd", "random", "--lkd-steps", "3", "--lkd-clip-lr", "0.01", "--json", str(out)])
    from zqcompile.cli.eval import run_eval
    res = run_eval(args)
    saved = json.loads(out.read_text())
    assert saved["ppl_fp32"] == pytest.approx(res["ppl_fp32"]) and saved["ppl_w4/8a8"] > 1
    assert len(saved["lkd"]) == 2
    assert all(b["loss_before"] > 0 and b["loss_after"] <= b["loss_before"] and b["seconds"] > 0 for b in saved["lkd"])
    assert saved["lkd_config"]["clip_lr"] == 0.01 and saved["lkd_config"]["steps"] == 3


def test_inspect_cli(gpt2_dir, tmp_path):
    d, text = gpt2_dir
    args = _parse(["inspect", str(d), "--text", str(text), "--out", str(tmp_path / "r.png"),
                   "--json", str(tmp_path / "r.json")])
    from zqcompile.cli.inspect_ranges import run_inspect
    ranges = run_inspect(args)
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data) == len(ranges) == 2 * 4 + 1
    assert any((tmp_path / n).exists() for n in ("r.png", "r.svg"))


def test_missing_model_is_a_clear_error():
    from zqcompile.cli.eval import load_for_eval
    from zqcompile.models import ModelLoadError
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_for_eval("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="neither"):
        load_for_eval("gpt-17")


def test_registered_in_zqcompile_cli(gpt2_dir, tmp_path):
    from zqcompile.cli.main import main
    d, text = gpt2_dir
    assert main(["inspect", str(d), "--text", str(text), "--max-tokens", "16", "--out", str(tmp_path / "x.svg")]) == 0
    assert (tmp_path / "x.svg").read_text().startswith("<svg")
