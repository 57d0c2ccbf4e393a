"""`zqcompile eval` refuses bad arguments, a model without a tokenizer and a text shorter than one window
with one line `zqcompile eval: error: ...` and exit code 2, before loading the model where it can."""
import json
import math
import os

import pytest

from zqcompile.cli.main import main

from ._tiny import tiny_gpt2
from .subproc import run_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("eval_errors")
    model = tiny_gpt2()  # context: 64 positions
    model.save_pretrained(root / "bare")  # what model.save_pretrained(dir) alone leaves: no tokenizer
    model.save_pretrained(root / "tok")
    vocab = {w: i for i, w in enumerate(["[UNK]", *"abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(root / "tok")
    (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 4)
    return root


def _one_line_error(r, cause: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("zqcompile eval: error: ")]
    assert lines == [f"zqcompile eval: error: {cause}"], r.stderr


def test_model_folder_without_tokenizer(folders):
    bare = folders / "bare"
    r = run_cli("eval", bare, "--text", folders / "t.txt", "--max-tokens", "100")
    _one_line_error(r, f"the folder {str(bare)!r} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                       f"save the tokenizer next to the model: tokenizer.save_pretrained({str(bare)!r})")


def test_text_shorter_than_one_window(folders):
    text = folders / "t.txt"
    r = run_cli("eval", folders / "tok", "--text", text, "--max-tokens", "20", "--window", "48")
    _one_line_error(r, f"--text {text} (its first --max-tokens 20) has 20 tokens, fewer than one window of 48: "
                       f"lower --window to 20 or less, or raise --max-tokens / use a longer text")


def test_window_longer_than_the_models_context(folders, capsys):
    assert main(["eval", str(folders / "tok"), "--text", str(folders / "t.txt"), "--max-tokens", "100",
                 "--window", "512"]) == 2
    err = capsys.readouterr().err  # after the weight-loading progress bar
    assert err.splitlines()[-1] == ("zqcompile eval: error: windows of 512 tokens (--window) are longer than the "
                                    "model's context of 64 tokens; use --window 64 or less")


def _bad_args(root):
    text, empty = root / "t.txt", root / "empty.txt"
    empty.write_text("  \n")
    return [
        (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["--window", "1"], "--window must be >= 2 (a token and the one it predicts), got 1"),
        (["--window", "8", "--stride", "9"], "--stride must be between 1 and --window (8), got 9"),
        (["--stride", "0"], "--stride must be between 1 and --window (512), got 0"),
        (["--lkd-steps", "-1"], "--lkd-steps must be >= 0, got -1"),
        (["--lkd-lr", "0"], "--lkd-lr must be a number > 0, got 0.0"),
        (["--lkd-lr", "nan"], "--lkd-lr must be a number > 0, got nan"),
        (["--lkd-clip-lr", "-1"], "--lkd-clip-lr must be a number >= 0, got -1.0"),
        (["--text", str(root / "nope.txt")], f"--text {root / 'nope.txt'}: no such file"),
        (["--text", str(root)], f"--text {root} is a directory; give a text file"),
        (["--text", str(empty)], f"--text {empty} is empty"),
        (["--lkd", str(text)], "--lkd text must not be the evaluation text (--text)"),
        (["--calib-text", str(text)], "--calib-text must not be the evaluation text (--text); omit it to calibrate "
                                      "on --text"),
        (["--calib-text", str(root / "nope.txt")], f"--calib-text {root / 'nope.txt'}: no such file"),
        (["--config", "w8a8-fws"], "--config w8a8-fws uses feature-wise scales, which the compiler applies: use "
                                   "--path engine"),
        (["--json", str(root)], f"cannot write the eval results to {str(root)!r}: it is a directory; give a file "
                                f"name (a path inside it, or another one)"),
        (["--json", str(root / "no" / "r.json")], f"cannot write the eval results to {str(root / 'no' / 'r.json')!r}: "
                                                  f"directory {str(root / 'no')!r} does not exist"),
        (["--json", str(text)], f"cannot write the eval results to {str(text)!r}: a file that is not a JSON file is "
                                f"there; remove it or choose another path"),
    ]


def test_arguments_are_checked_before_the_model_loads(folders, capsys):
    # the model does not exist: each error below comes before any attempt to load it
    for extra, cause in _bad_args(folders):
        argv = ["eval", "/nonexistent/model", "--text", str(folders / "t.txt"), *extra]
        assert main(argv) == 2, extra
        assert capsys.readouterr().err == f"zqcompile eval: error: {cause}\n", extra


def test_json_is_written_atomically(tmp_path, monkeypatch):
    from zqcompile.cli import eval as eval_cli
    out = tmp_path / "r.json"
    eval_cli._write_json(str(out), {"ppl_fp32": 1.5})
    assert json.loads(out.read_text()) == {"ppl_fp32": 1.5} and os.listdir(tmp_path) == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        eval_cli._write_json(str(out), {"ppl_fp32": 2.0})
    assert json.loads(out.read_text()) == {"ppl_fp32": 1.5} and os.listdir(tmp_path) == ["r.json"]


def test_engine_eval_with_feature_scales_calibrated_on_another_text(folders, tmp_path):
    """The installed command, in its own process: w8a8-fws through the engine, calibrated on --calib-text."""
    other = tmp_path / "other.txt"
    other.write_text("pack my box with five dozen liquor jugs " * 4)
    out = tmp_path / "r.json"
    r = run_cli("eval", folders / "tok", "--text", folders / "t.txt", "--calib-text", other, "--config", "w8a8-fws",
                "--path", "engine", "--window", "32", "--max-tokens", "128", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["calibration_text"] == str(other) and res["config"] == "w8a8-fws"
    assert 1.0 < res["ppl_fp32"] < 1e3 and abs(res["ppl_w8a8-fws"] / res["ppl_fp32"] - 1) < 0.05, res


def test_compile_to_an_accuracy_budget_through_the_installed_command(folders, capsys):
    assert main(["compile", str(folders / "tok"), "--accuracy-budget", "1%"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "zqcompile compile: error: --accuracy-budget measures perplexity on calibration text: give --calib-text "
        "FILE (text like what the model will serve)")
    r = run_cli("compile", folders / "tok", "--accuracy-budget", "0.5%", "--calib-text", folders / "t.txt",
                "--seq", "32", "--no-generation")
    assert r.returncode == 0, r.stderr
    # a safetensors folder streams by default; the budget measures through the whole model, so it is loaded
    assert "measures its accuracy budget through the whole model: loading the whole model" in r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "budget 0.005" in ln)
    pred, measured = (float(x) for x in __import__("re").search(
        r"predicted KL ([\d.e-]+) .*measured through the engine KL ([\d.e-]+)", r.stdout).groups())
    assert math.expm1(pred) <= 0.005 + 1e-9 and abs(measured - pred) <= 0.05 * pred + 1e-7, line
