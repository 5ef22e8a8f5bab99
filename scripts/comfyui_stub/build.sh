#!/usr/bin/env bash
# Build the CUDA symbol stubs that let ComfyUI's *test server* import PyPI's CUDA builds of
# torchvision/torchaudio next to a CPU-only torch. Never used by the pack itself.
#
# Usage: build.sh OUT_DIR
#   Writes OUT_DIR/libc10_cuda.so and OUT_DIR/libtorch_cuda.so (each with that soname, so the
#   loader matches torchvision's DT_NEEDED entries once both are preloaded) and prints the
#   value to put in LD_PRELOAD on stdout. CC overrides the compiler (default: gcc).
set -euo pipefail

out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
src="$here/cuda_stub.c"
cc=${CC:-gcc}

mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

for lib in c10_cuda torch_cuda; do
    macro="STUB_$(printf '%s' "$lib" | tr '[:lower:]' '[:upper:]')"
    "$cc" -shared -fPIC -O2 -Wall -Wextra -Werror -D"$macro" \
        -Wl,-soname,"lib$lib.so" -o "$tmp/lib$lib.so" "$src"
done

# Move each finished library into place (rename is atomic: a concurrent reader never sees a
# half-written file).
for lib in c10_cuda torch_cuda; do
    mv -f "$tmp/lib$lib.so" "$out/lib$lib.so"
done

echo "$out/libc10_cuda.so $out/libtorch_cuda.so"
