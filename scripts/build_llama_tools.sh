#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-bench, llama-batched-bench,
# llama-server, llama-cli) from the llama.cpp source vendored in the
# llama-cpp-python sdist, so benchmarks compare like with like.
#
# Usage: scripts/build_llama_tools.sh [BUILD_DIR]     (default: .build/llama.cpp)
#
# Layout:  BUILD_DIR/src    vendor/llama.cpp from the sdist
#          BUILD_DIR/build  cmake build tree
#          BUILD_DIR/bin -> build/bin   (BUILD_DIR/bin/llama-bench, ...)
#
# Environment:
#   PYTHON                  interpreter whose pip downloads the sdist (default: python3)
#   LLAMA_CPP_PYTHON_SDIST  use this local llama_cpp_python-<ver>.tar.gz instead of downloading
#   LLAMA_TOOLS_CMAKE_ARGS  extra cmake configure args, e.g. "-DGGML_CUDA=on -DGGML_RPC=on"
#   LLAMA_TOOLS_JOBS        parallel build jobs (default: nproc)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
# sha256 of llama_cpp_python-0.3.36.tar.gz as published on PyPI
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TARGETS=(llama-bench llama-batched-bench llama-server llama-cli)

log() { printf '[build_llama_tools] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)

BUILD_DIR=${1:-.build/llama.cpp}
mkdir -p "$BUILD_DIR"
BUILD_DIR=$(cd "$BUILD_DIR" && pwd)
SRC="$BUILD_DIR/src"
OBJ="$BUILD_DIR/build"
BIN="$BUILD_DIR/bin"
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${LLAMA_TOOLS_CMAKE_ARGS:-}
JOBS=${LLAMA_TOOLS_JOBS:-$(nproc)}

# Configure arguments. GGML_NATIVE=ON matches llama-cpp-python's default
# from-source build. No network at build time: no prebuilt web UI download
# from Hugging Face, no npm UI build (llama-server is built without the
# embedded web UI; its HTTP API is unaffected), no OpenSSL (HTTPS -hf downloads).
CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
)
if [[ -n "$EXTRA_ARGS" ]]; then
    # shellcheck disable=SC2206  # word splitting of the user's extra args is intended
    CMAKE_ARGS+=($EXTRA_ARGS)
fi
CONFIG_KEY="$LLAMA_CPP_PYTHON_VERSION ${CMAKE_ARGS[*]}"
CONFIG_STAMP="$BUILD_DIR/.config"
SRC_STAMP="$SRC/.llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"

# --- up to date? -------------------------------------------------------------
up_to_date() {
    [[ -f "$SRC_STAMP" && -f "$CONFIG_STAMP" ]] || return 1
    [[ "$(cat "$CONFIG_STAMP")" == "$CONFIG_KEY" ]] || return 1
    local t
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN/$t" ]] || return 1
        # any source file newer than a binary -> rebuild
        [[ -z "$(find "$SRC" -newer "$BIN/$t" -type f -print -quit)" ]] || return 1
    done
}
if up_to_date; then
    log "up to date: $BIN/{$(IFS=,; echo "${TARGETS[*]}")} (nothing to do)"
    exit 0
fi

# --- source ------------------------------------------------------------------
if [[ ! -f "$SRC_STAMP" || ! -f "$SRC/CMakeLists.txt" ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sdist=${LLAMA_CPP_PYTHON_SDIST:-}
    if [[ -z "$sdist" ]]; then
        log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist with pip"
        # pip prepares the sdist's metadata in an isolated build env
        # (it installs scikit-build-core there); that is quick since no compile happens.
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp/dl" >&2 \
            || die "pip download of llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed"
        sdist="$tmp/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    fi
    [[ -f "$sdist" ]] || die "sdist not found: $sdist"
    actual=$(sha256sum "$sdist" | cut -d' ' -f1)
    [[ "$actual" == "$SDIST_SHA256" ]] || die "sha256 mismatch for $sdist: $actual"

    log "extracting vendor/llama.cpp into $SRC"
    top="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$sdist" -C "$tmp" "$top/vendor/llama.cpp" "$top/.git/modules/vendor/llama.cpp/HEAD"
    commit=$(head -c 12 "$tmp/$top/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null || echo unknown)
    # the submodule's .git link points into the sdist's .git, which we don't keep
    rm -f "$tmp/$top/vendor/llama.cpp/.git"
    rm -rf "$SRC" "$OBJ"
    mv "$tmp/$top/vendor/llama.cpp" "$SRC"
    echo "$commit" > "$SRC_STAMP"
fi
commit=$(cat "$SRC_STAMP")

# --- configure + build -------------------------------------------------------
# The source tree has no .git: keep llama.cpp's build-info from picking up the
# enclosing repository (BUILD_DIR is usually inside it) and record the
# vendored commit instead.
export GIT_CEILING_DIRECTORIES="$BUILD_DIR"
if [[ -f "$CONFIG_STAMP" && "$(cat "$CONFIG_STAMP")" != "$CONFIG_KEY" ]]; then
    log "configuration changed: starting from a clean build tree"
    rm -rf "$OBJ"
fi
log "configuring (llama.cpp $commit${EXTRA_ARGS:+, extra: $EXTRA_ARGS})"
cmake -S "$SRC" -B "$OBJ" -G "Unix Makefiles" "${CMAKE_ARGS[@]}" \
    -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER=0 \
    > "$BUILD_DIR/configure.log" 2>&1 \
    || { tail -n 40 "$BUILD_DIR/configure.log" >&2; die "cmake configure failed (see $BUILD_DIR/configure.log)"; }
echo "$CONFIG_KEY" > "$CONFIG_STAMP"

log "building ${TARGETS[*]} with -j$JOBS (log: $BUILD_DIR/build.log)"
start=$SECONDS
cmake --build "$OBJ" --config Release -j"$JOBS" --target "${TARGETS[@]}" \
    > "$BUILD_DIR/build.log" 2>&1 \
    || { tail -n 40 "$BUILD_DIR/build.log" >&2; die "build failed (see $BUILD_DIR/build.log)"; }

# Executables land in build/bin; expose them as BUILD_DIR/bin.
[[ -L "$BIN" || ! -e "$BIN" ]] || die "$BIN exists and is not a symlink; remove it"
ln -sfn build/bin "$BIN"
for t in "${TARGETS[@]}"; do
    [[ -x "$BIN/$t" ]] || die "missing $BIN/$t after build"
    touch "$BIN/$t"   # make up-to-date check robust when make had nothing to relink
done
log "done in $((SECONDS - start))s: ${BIN#"$REPO_ROOT"/}/{$(IFS=,; echo "${TARGETS[*]}")}"
