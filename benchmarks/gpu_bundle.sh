#!/usr/bin/env bash
# Prepare .gpu_bundle/ (git-ignored) for benchmarks/gpu_check.sh on a GPU machine that cannot download:
#   .gpu_bundle/wheels/  the pure-Python packages gptforge needs that such an image lacks
#                        (jsonargparse, docstring-parser; everything else it imports is there)
#   .gpu_bundle/data/    tinyshakespeare.txt and the tiktoken cache for GPT-2's BPE
# Run it here, on a machine that reaches PyPI, from anywhere:
#   bash benchmarks/gpu_bundle.sh [SHARED_DATA_DIR]     (default: ../shared/data beside the repo)
# then carry .gpu_bundle to the GPU machine and run: bash benchmarks/gpu_check.sh .gpu_bundle
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_src="${1:-$repo/../shared/data}"
bundle="$repo/.gpu_bundle"
py="${PYTHON:-python3}"

[[ -f "$data_src/tinyshakespeare.txt" && -d "$data_src/tiktoken_cache" ]] || {
  echo "gpu_bundle: $data_src has no tinyshakespeare.txt and tiktoken_cache/ (pass the shared data folder)" >&2; exit 2; }

# The versions installed here, which the test suite has passed with; unpinned where one is missing.
pin() { "$py" -c "import importlib.metadata as m, sys
try: print(sys.argv[1] + '==' + m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[1])" "$1"; }
pkgs=("$(pin jsonargparse)" "$(pin docstring-parser)")

rm -rf "$bundle.tmp" && mkdir -p "$bundle.tmp/wheels" "$bundle.tmp/data/tiktoken_cache"
# Pure-Python wheels; the target's Python (3.12) named so that pip picks wheels that install there.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  -d "$bundle.tmp/wheels" "${pkgs[@]}"
cp "$data_src/tinyshakespeare.txt" "$bundle.tmp/data/"
cp "$data_src"/tiktoken_cache/* "$bundle.tmp/data/tiktoken_cache/"
# Replaced only once everything is in place: a failed download leaves the previous bundle as it was.
rm -rf "$bundle" && mv "$bundle.tmp" "$bundle"
echo "gpu_bundle: $bundle ($(du -sh "$bundle" | cut -f1)):"
(cd "$bundle" && find . -type f | sort | sed 's/^/  /')
