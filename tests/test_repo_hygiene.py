"""The repository holds source, not run artefacts."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_profiler_dumps_or_engine_files_in_the_tree():
    stray = [p.name for pattern in ("onnxruntime_profile__*.json", "*.zq", "*.onnx") for p in REPO.glob(pattern)]
    assert not stray, f"run artefacts at the repository root: {stray}"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "onnxruntime_profile__*.json" in ignored
