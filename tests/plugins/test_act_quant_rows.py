"""The act_quant binding's in-place row layout (cuda._pitched_rows, no GPU needed): x and gate are read in place
only as [rows, k] with one shared row pitch >= k and unit column stride; anything else is copied as before."""
import torch

from zqcompile.plugins import cuda


def test_halves_of_a_fused_output_are_read_in_place_with_its_pitch():
    y = torch.randn(16, 1, 2 * 64)
    xr, gr, ld = cuda._pitched_rows(y[..., 64:], y[..., :64], 64)
    assert ld == 128 and xr.data_ptr() == y[..., 64:].data_ptr() and gr.data_ptr() == y.data_ptr()
    assert xr.shape == gr.shape == (16, 64)


def test_contiguous_and_single_rows_keep_pitch_k():
    x = torch.randn(4, 3, 64)
    assert cuda._pitched_rows(x, None, 64)[2] == 64
    y = torch.randn(1, 1, 128)
    assert cuda._pitched_rows(y[..., 64:], y[..., :64], 64)[2] == 64


def test_other_layouts_are_copied():
    x = torch.randn(64, 8).t()  # column stride 64
    assert cuda._pitched_rows(x, None, 64)[0] is None
    e = torch.randn(1, 64).expand(4, 64)  # rows overlap (pitch 0)
    assert cuda._pitched_rows(e, None, 64)[0] is None
    y, z = torch.randn(4, 128), torch.randn(4, 192)
    assert cuda._pitched_rows(y[:, :64], z[:, :64], 64)[0] is None  # pitches differ
    w = torch.randn(2, 3, 128)[:, :2, :64]  # leading dims do not merge into one strided dim
    assert cuda._pitched_rows(w.transpose(0, 1), None, 64)[0] is None


def test_a_bad_kernel_switch_fails_at_import_in_one_line():
    """ZQ_PDL, ZQ_ACT_QUANT_STRIDED, ZQ_ROW_SPLIT, ZQ_DECODE_ATTENTION, ZQ_ROPE_KV outside their values: the
    import fails with one line naming the variable, the values it takes and the value given."""
    import json
    import os
    import subprocess
    import sys
    cases = [("ZQ_PDL", "on", "-1, 0, 1"), ("ZQ_ACT_QUANT_STRIDED", "yes", "0, 1"), ("ZQ_ROW_SPLIT", "many",
             "a row count"), ("ZQ_DECODE_ATTENTION", "flash", "split, single"), ("ZQ_ROPE_KV", "both", "fused, split")]
    # the process as a user meets it: the import fails, its last line is the message
    r = subprocess.run([sys.executable, "-c", "import zqcompile.plugins.cuda"], capture_output=True, text=True,
                       env={**os.environ, "ZQ_PDL": "on"})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("ValueError: ZQ_PDL must be") and "'on'" in last, r.stderr
    # every switch, each a fresh import of the module in one child process (one interpreter start, not five)
    child = """
import importlib, json, os, sys
out = {}
for name, bad in json.loads(sys.argv[1]):
    os.environ[name] = bad
    sys.modules.pop("zqcompile.plugins.cuda", None)
    try:
        importlib.import_module("zqcompile.plugins.cuda")
        out[name] = None
    except ValueError as e:
        out[name] = str(e)
    del os.environ[name]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", child, json.dumps([(n, b) for n, b, _ in cases])], capture_output=True,
                       text=True, env={k: v for k, v in os.environ.items() if k not in {n for n, _, _ in cases}})
    assert r.returncode == 0, r.stderr
    msgs = json.loads(r.stdout.strip().splitlines()[-1])
    for name, bad, says in cases:
        msg = msgs[name]
        assert msg is not None and msg.startswith(f"{name} must be") and says in msg and repr(bad) in msg, (name, msg)
        assert "\n" not in msg
