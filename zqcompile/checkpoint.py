"""A Hugging Face safetensors folder read one tensor at a time (streamed compiles, zqcompile/streaming.py).

The index (which file holds which tensor and its shape: the files' headers, those `model.safetensors.index.json`
names where there is one) is read once; each load opens the file, reads that one tensor straight to the target
device (safetensors' `safe_open`) and closes it again, so the process never maps more of a 16 GB file than the
tensor it is working on.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from zqcompile.errors import ModelLoadError
from zqcompile.models import first_line

INDEX_FILE = "model.safetensors.index.json"


def has_safetensors(path: str) -> bool:
    """A folder with a config.json and its weights in safetensors files."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and bool(glob.glob(os.path.join(path, "*.safetensors"))))


class SafetensorsFolder:
    """name -> (file, shape) for every tensor of the folder (headers only); `load(name, device, dtype)` reads one."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):  # a sharded checkpoint: the files the index names, as from_pretrained reads it
            try:
                with open(index, encoding="utf-8") as f:
                    files = sorted({os.path.join(path, file) for file in json.load(f)["weight_map"].values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        self.files: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        self.files[name] = file
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except Exception as e:  # noqa: BLE001 - missing or damaged: one line naming the file
                raise ModelLoadError(f"{file}: not a readable safetensors file ({first_line(e)})") from None
        if not self.files:
            raise ModelLoadError(f"{path!r} holds no safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def load(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` on `device` (cast to `dtype`, as from_pretrained(dtype=...) casts it)."""
        from safetensors import safe_open
        with safe_open(self.files[name], framework="pt", device=_device_arg(device)) as f:
            t = f.get_tensor(name)
        if dtype is not None and t.dtype != dtype:
            return t.to(dtype)
        # on the CPU safetensors hands out a view of the mapped file (it would change with the file, and keep
        # it mapped): what an engine holds is its own
        return t.clone() if t.device.type == "cpu" else t


def _device_arg(device: torch.device) -> str | int:
    device = torch.device(device)
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)
