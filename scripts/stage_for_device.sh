#!/usr/bin/env bash
# Copy what a GPU-machine run needs (package, GPU tests, bench, the built library) into an ignored folder of
# the checkout the device tool sends (default /work/main/.cudawork/repo). Developer tooling, not CI.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dst="${1:-/work/main/.cudawork/repo}"
rm -rf "$dst" && mkdir -p "$dst/build" "$dst/tests"
cp -r "$src/zqcompile" "$src/bench" "$src/pyproject.toml" "$dst/"
cp -r "$src/tests/gpu" "$dst/tests/"
cp "$src/build/libzq_kernels.so" "$dst/build/"
find "$dst" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$dst"
