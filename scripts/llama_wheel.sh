#!/usr/bin/env bash
# Build the pinned llama-cpp-python wheel once per build configuration and print its path.
#
# Usage: scripts/llama_wheel.sh PYTHON WHEEL_DIR CMAKE_ARGS...
#
# Why not plain `pip install`: pip's wheel cache is keyed by the sdist's URL, not by CMAKE_ARGS, so a
# wheel built without -DGGML_RPC=on would be reused silently for a build that asks for it. Here the
# configuration names the folder, the wheel is built with pip's cache off, and the folder only
# appears (by rename) once the wheel is complete.
set -euo pipefail

VERSION=0.3.36
python=$1; wheel_dir=$2; shift 2
cmake_args="$*"

find_wheel() { compgen -G "$wheel_dir/llama_cpp_python-$VERSION-*.whl" | head -n1; }

if wheel=$(find_wheel) && [[ -n "$wheel" ]]; then
    echo "$wheel"
    exit 0
fi

echo "Compiling llama-cpp-python $VERSION with CMAKE_ARGS='$cmake_args' (once, ~5 min; cached in $wheel_dir)" >&2
tmp="$wheel_dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp" "$(dirname "$wheel_dir")"
trap 'rm -rf "$tmp"' EXIT
CMAKE_ARGS="$cmake_args" "$python" -m pip wheel --quiet --no-deps --no-cache-dir \
    --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$tmp" >&2
rm -rf "$wheel_dir"
mv "$tmp" "$wheel_dir"
trap - EXIT
find_wheel
