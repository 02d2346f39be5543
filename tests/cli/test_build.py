"""`ggufchat build`: command construction, the pre-build checks, the runner and the verification.

Nothing here compiles or reinstalls anything: the CLI runs only with --dry-run or with a check that
fails before pip starts, and even then pip is pointed at no index (see _env) in case a check passed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path

import llama_cpp
import pytest

from ggufchat.build import (
    BuildPlan,
    VerifyResult,
    check_result,
    default_jobs,
    failure,
    key_error,
    meaningful,
    parse_cuda_arch,
    pinned_version,
    preflight,
    run_pip,
    verify,
)
from ggufchat.engine import devices
from ggufchat.errors import BuildError, InvalidParameter
from tests.conftest import run_cli

PIP = (f"{shlex.quote(sys.executable)} -m pip install --force-reinstall --no-cache-dir "
       "--no-binary llama-cpp-python --no-deps -v llama-cpp-python==0.3.36")


def _path_without(*tools: str) -> str:
    """The current PATH minus every folder holding one of `tools`."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any((Path(d) / t).exists() for t in tools)]
    return os.pathsep.join(keep)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    links = tmp_path / "no-index"
    links.mkdir(exist_ok=True)
    # Should a check ever pass by accident, pip finds nothing to install and stops before touching .venv.
    return {"GGUFCHAT_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), **extra}


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


FAKE_NVCC = 'echo "nvcc: NVIDIA (R) Cuda compiler driver"; echo "Cuda compilation tools, release 12.4, V12.4.131"'
FAKE_SMI = 'echo "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB"'


def _error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


# --- dry runs: the exact commands --------------------------------------------------------------------

def test_dry_run_cuda(tmp_path):
    result = run_cli("build", "--cuda", "--dry-run", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # RPC is on by default, as in `make install`: a GPU rebuild must not lose `rpc-worker` / --rpc.
    assert "export CMAKE_ARGS='-DGGML_CUDA=on -DGGML_RPC=on'" in lines
    assert f"export CMAKE_BUILD_PARALLEL_LEVEL={default_jobs()}" in lines
    assert PIP in lines
    assert any(x.startswith(f"{shlex.quote(sys.executable)} -I -c ") for x in lines)  # the fresh-process check
    assert str(tmp_path / "home" / "build-logs") in result.stdout
    assert not (tmp_path / "home").exists()  # nothing ran, no log was opened


def test_dry_run_cuda_arch_rpc_jobs(tmp_path):
    result = run_cli("build", "--cuda", "--cuda-arch", "86;90", "--rpc", "--jobs", "4", "--dry-run",
                     env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "export CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86;90 -DGGML_RPC=on'" in lines
    assert "export CMAKE_BUILD_PARALLEL_LEVEL=4" in lines
    assert PIP in lines


def test_dry_run_cpu(tmp_path):
    result = run_cli("build", "--cpu", "--no-rpc", "--dry-run", env=_env(tmp_path, CMAKE_ARGS="-DGGML_CUDA=on"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Set empty on purpose: an exported CMAKE_ARGS must not sneak CUDA back in.
    assert "export CMAKE_ARGS=''" in lines
    assert "GGML_CUDA" not in result.stdout
    assert PIP in lines


def test_dry_run_cpu_rpc(tmp_path):
    result = run_cli("build", "--cpu", "-j", "3", "--dry-run", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "export CMAKE_ARGS=-DGGML_RPC=on" in result.stdout.splitlines()
    assert "export CMAKE_BUILD_PARALLEL_LEVEL=3" in result.stdout.splitlines()


def test_plan_environment():
    plan = BuildPlan.from_flags(cuda=True, cpu=False, rpc=True, cuda_arch="80,86", jobs=2)
    assert plan.env == {"CMAKE_ARGS": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;86 -DGGML_RPC=on",
                        "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    assert plan.pip_command[:3] == [sys.executable, "-m", "pip"]
    assert "--no-cache-dir" in plan.pip_command
    assert pinned_version() == "0.3.36"


# --- flag errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["8.6", "sm_86", "native;86", "", "86;x"])
def test_invalid_cuda_arch(tmp_path, arch):
    result = run_cli("build", "--cuda", "--cuda-arch", arch, "--dry-run", env=_env(tmp_path))
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert "--cuda-arch" in line and "80;86;90" in line
    assert result.stdout == ""


@pytest.mark.parametrize("arch, expected", [("86;90", "86;90"), ("80, 86", "80;86"), ("native", "native"),
                                            ("90a", "90a"), ("86-real;90-virtual", "86-real;90-virtual")])
def test_valid_cuda_arch(arch, expected):
    assert parse_cuda_arch(arch) == expected


@pytest.mark.parametrize("args, says", [
    ([], "--cuda or --cpu"),
    (["--cuda", "--cpu"], "exclude each other"),
    (["--cpu", "--cuda-arch", "86"], "--cuda-arch needs --cuda"),
    (["--cpu", "--jobs", "0"], "--jobs"),
])
def test_flag_combinations(tmp_path, args, says):
    result = run_cli("build", *args, "--dry-run", env=_env(tmp_path))
    assert result.returncode == 1
    assert says in _error_line(result.stderr)


# --- pre-build checks --------------------------------------------------------------------------------

def test_nvcc_missing(tmp_path):
    empty = tmp_path / "cuda"
    empty.mkdir()
    env = _env(tmp_path, PATH=_path_without("nvcc"), CUDA_HOME=str(empty))
    result = run_cli("build", "--cuda", env=env)
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert "nvcc" in line and "not found" in line
    assert str(empty / "bin") in line  # where it looked
    assert "Install the CUDA Toolkit" in line
    assert "ggufchat build --cpu" in line
    assert not (tmp_path / "home" / "build-logs").exists()


def test_driver_missing(tmp_path):
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "nvcc", FAKE_NVCC)
    env = _env(tmp_path, PATH=os.pathsep.join([str(bin_dir), _path_without("nvcc", "nvidia-smi")]))
    result = run_cli("build", "--cuda", env=env)
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert "nvidia-smi" in line and "NVIDIA driver" in line
    assert "Install the NVIDIA driver" in line
    assert not (tmp_path / "home" / "build-logs").exists()


def test_broken_nvcc(tmp_path):
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "nvcc", 'echo "libcudart.so: cannot open shared object file" >&2; exit 127')
    env = _env(tmp_path, PATH=os.pathsep.join([str(bin_dir), _path_without("nvcc")]))
    result = run_cli("build", "--cuda", env=env)
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert "--version" in line and "libcudart.so" in line and "CUDA Toolkit" in line


def test_preflight_passes_and_points_cmake_at_nvcc_outside_path(tmp_path):
    cuda_home = tmp_path / "cuda"
    nvcc = _script(cuda_home / "bin", "nvcc", FAKE_NVCC)
    smi_dir = tmp_path / "driver"
    _script(smi_dir, "nvidia-smi", FAKE_SMI)
    env = {"PATH": os.pathsep.join([str(smi_dir), _path_without("nvcc", "nvidia-smi")]), "CUDA_HOME": str(cuda_home)}
    plan = BuildPlan.from_flags(cuda=True, cpu=False, jobs=1)
    checks = {c.name: c.detail for c in preflight(plan, env)}
    assert checks["nvcc"] == f"CUDA 12.4 at {nvcc}"
    assert checks["GPU"] == "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB"
    assert "C++ compiler" in checks and "cmake" in checks
    # CMake looks for nvcc on PATH only; one found through CUDA_HOME is handed over as CUDACXX.
    assert plan.env["CUDACXX"] == str(nvcc)


def test_cpu_preflight_needs_no_cuda(tmp_path):
    plan = BuildPlan.from_flags(cuda=False, cpu=True, jobs=1)
    checks = preflight(plan, {"PATH": _path_without("nvcc", "nvidia-smi")})
    assert [c.name for c in checks] == ["C++ compiler", "cmake"]


def test_no_compiler(tmp_path):
    plan = BuildPlan.from_flags(cuda=False, cpu=True, jobs=1)
    with pytest.raises(BuildError, match="no C\\+\\+ compiler") as err:
        preflight(plan, {"PATH": str(tmp_path)})
    assert "build-essential" in (err.value.hint or "")


# --- the runner and its failure report ---------------------------------------------------------------

BUILD_LOG = """\
Building wheels for collected packages: llama-cpp-python
  -- Configuring done (2.1s)
  [1/120] Building C object vendor/llama.cpp/ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o
  [2/120] Building CUDA object vendor/llama.cpp/ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/acc.cu.o
  FAILED: vendor/llama.cpp/ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/argmax.cu.o
  nvcc fatal   : Unsupported gpu architecture 'compute_20'
  ninja: build stopped: subcommand failed.
  error: subprocess-exited-with-error
ERROR: Failed building wheel for llama-cpp-python
"""


def test_key_error_and_progress_lines():
    lines = BUILD_LOG.splitlines()
    assert key_error(lines) == "nvcc fatal   : Unsupported gpu architecture 'compute_20'"
    assert [x.split()[0] for x in lines if meaningful(x)] == ["Building", "--", "[1/120]", "[2/120]"]
    cmake = ["-- Looking for pthread_create in pthreads - not found",
             "CMake Error at CMakeLists.txt:3 (enable_language):",
             "  No CMAKE_CUDA_COMPILER could be found.", "error: subprocess-exited-with-error"]
    assert key_error(cmake) == ("CMake Error at CMakeLists.txt:3 (enable_language): "
                                "No CMAKE_CUDA_COMPILER could be found.")


def test_run_pip_streams_to_the_log_and_reports_the_error(tmp_path):
    # A stand-in for the interpreter: prints a build log and fails, as pip would.
    log_src = tmp_path / "src.log"
    log_src.write_text(BUILD_LOG)
    fake_python = _script(tmp_path / "bin", "python", f'cat "{log_src}"; exit 1')
    plan = BuildPlan.from_flags(cuda=True, cpu=False, cuda_arch="20", jobs=1, python=str(fake_python))
    seen: list[str] = []
    log = tmp_path / "logs" / "build.log"
    status = run_pip(plan, log, seen.append)
    assert status == 1
    assert seen == BUILD_LOG.splitlines()
    text = log.read_text()
    assert "# CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=20" in text and text.endswith(BUILD_LOG)
    err = failure(plan, status, log)
    assert "Unsupported gpu architecture" in str(err)
    assert str(log) in (err.hint or "")


# --- verification in a fresh interpreter -------------------------------------------------------------

def test_verify_reports_what_this_library_was_built_with():
    """verify() asks a fresh interpreter; it must say what llama.cpp, asked here, says of the same
    library: a CPU build on one machine, a CUDA build on another."""
    result = verify()
    assert isinstance(result, VerifyResult)
    assert result.version == pinned_version()
    assert Path(result.library) == devices.library_folder() and Path(result.library).is_dir()
    assert result.backends == devices.list_backends() and "CPU" in result.backends
    assert result.devices == [d.description for d in devices.list_devices()]
    info = devices.system_info()
    assert result.gpu_offload is info["gpu_offload"]
    assert result.rpc is info["rpc"]
    if result.gpu_offload:  # llama.cpp's own flag (it also says yes for RPC alone, hence not the reverse)
        assert llama_cpp.llama_supports_gpu_offload()


def _cpu_only(result: VerifyResult) -> VerifyResult:
    """What the same library would report built without a GPU backend."""
    cpu = [d.description for d in devices.list_devices() if d.kind == "cpu"]
    return dataclasses.replace(result, gpu_offload=False, devices=cpu,
                               backends=[b for b in result.backends if b in devices.HOST_BACKENDS])


def _with_cuda(result: VerifyResult) -> VerifyResult:
    """What the same library would report built with CUDA, on a machine with one GPU."""
    return dataclasses.replace(result, gpu_offload=True, backends=[*result.backends, "CUDA"],
                               devices=[*result.devices, "NVIDIA H100 80GB HBM3"])


def test_check_result_on_a_cpu_only_and_a_cuda_build():
    """Both outcomes of a --cuda build: this machine's library is one of them, the other is described."""
    result = verify()
    cpu_build = result if not result.gpu_offload else _cpu_only(result)
    cuda_build = result if "CUDA" in result.backends else _with_cuda(result)
    cpu_plan = BuildPlan.from_flags(cuda=False, cpu=True, jobs=1)
    cuda_plan = BuildPlan.from_flags(cuda=True, cpu=False, jobs=1)

    check_result(cpu_plan, cpu_build, None)  # what a --cpu build wants
    check_result(cuda_plan, cuda_build, None)  # what a --cuda build wants
    with pytest.raises(BuildError, match="CPU-only") as err:
        check_result(cuda_plan, cpu_build, Path("/tmp/x.log"))  # a --cuda build that lost its GPU backend
    assert "/tmp/x.log" in (err.value.hint or "")
    assert "backends: " + ", ".join(cpu_build.backends) in str(err.value)


def test_verify_reports_a_library_that_does_not_import(tmp_path):
    fake_python = _script(tmp_path / "bin", "python",
                          'echo "OSError: libcudart.so.12: cannot open shared object file" >&2; exit 1')
    with pytest.raises(BuildError, match="does not import: OSError: libcudart.so.12"):
        verify(str(fake_python))


def test_invalid_parameter_type():
    with pytest.raises(InvalidParameter):
        BuildPlan.from_flags(cuda=True, cpu=False, cuda_arch="sm_86")
