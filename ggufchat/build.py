"""Rebuild llama-cpp-python from source (CUDA, RPC or plain CPU) and check what the build came out as.

Pure logic: a `BuildPlan` from the flags, the pre-build checks, the pip runner and the verification in a
fresh interpreter. The `ggufchat build` verb (ggufchat/cli/build.py) only wires these to the terminal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from ggufchat.errors import BuildError, InvalidParameter
from ggufchat.machine import available_cpus

PACKAGE = "llama-cpp-python"
# Fallback only: the pin is read from ggufchat's own installed requirements (which come from
# pyproject.toml), so the two cannot drift apart in an installed ggufchat.
DEFAULT_PIN = "0.3.36"

_ARCH_ITEM = re.compile(r"^\d{2,3}[a-z]?(-real|-virtual)?$")  # 86, 90a, 120-real
_ARCH_WORDS = {"native", "all", "all-major"}


def pinned_version() -> str:
    """The llama-cpp-python version ggufchat is pinned to (`llama-cpp-python==X` in its metadata)."""
    try:
        reqs = requires("ggufchat") or []
    except PackageNotFoundError:
        reqs = []
    for req in reqs:
        m = re.match(r"^llama[-_.]cpp[-_.]python\s*==\s*([\w.+-]+)\s*(;.*)?$", req, re.IGNORECASE)
        if m:
            return m.group(1)
    return DEFAULT_PIN


def parse_cuda_arch(value: str) -> str:
    """`80;86;90`, `86,90`, `native`, `all`, `90a`, `86-real` -> CMake's `;`-separated list."""
    items = [x.strip() for x in re.split(r"[;,\s]+", value.strip()) if x.strip()]
    bad = [x for x in items if not (_ARCH_ITEM.match(x) or x in _ARCH_WORDS)]
    if not items or bad or (len(items) > 1 and set(items) & _ARCH_WORDS):
        shown = ", ".join(bad) if bad else repr(value)
        raise InvalidParameter(
            f"invalid --cuda-arch {shown}", param="--cuda-arch",
            hint="Give compute capabilities without the dot, e.g. --cuda-arch '80;86;90' (8.6 -> 86), "
                 "or one of native, all, all-major.")
    return ";".join(items)


@dataclass
class BuildPlan:
    """What `ggufchat build` will run: the pip command, its environment and the verification command."""

    cuda: bool = False
    rpc: bool = False
    cuda_arch: str | None = None
    jobs: int = 1
    version: str = DEFAULT_PIN
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. CUDACXX when nvcc is not on PATH

    @classmethod
    def from_flags(cls, *, cuda: bool, cpu: bool, rpc: bool = False, cuda_arch: str | None = None,
                   jobs: int | None = None, python: str | None = None, version: str | None = None) -> BuildPlan:
        if cuda and cpu:
            raise InvalidParameter("--cuda and --cpu exclude each other", param="--cuda",
                                   hint="Pick one: --cuda for an NVIDIA GPU build, --cpu to go back to a CPU build.")
        if not cuda and not cpu:
            raise InvalidParameter("say which build: --cuda or --cpu", param="--cuda",
                                   hint="Run e.g. `ggufchat build --cuda` or `ggufchat build --cpu --rpc`; add "
                                        "--dry-run to see the commands first.")
        if cuda_arch is not None and not cuda:
            raise InvalidParameter("--cuda-arch needs --cuda", param="--cuda-arch")
        if jobs is not None and jobs < 1:
            raise InvalidParameter(f"--jobs must be at least 1, not {jobs}", param="--jobs")
        return cls(
            cuda=cuda, rpc=rpc,
            cuda_arch=parse_cuda_arch(cuda_arch) if cuda_arch is not None else None,
            jobs=jobs or default_jobs(),
            version=version or pinned_version(),
            python=python or sys.executable,
        )

    @property
    def kind(self) -> str:
        return ("CUDA" if self.cuda else "CPU") + (" + RPC" if self.rpc else "")

    @property
    def cmake_args(self) -> str:
        args = []
        if self.cuda:
            args.append("-DGGML_CUDA=on")
            if self.cuda_arch:
                args.append(f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_arch}")
        if self.rpc:
            args.append("-DGGML_RPC=on")
        return " ".join(args)

    @property
    def env(self) -> dict[str, str]:
        """The variables set for pip on top of the current environment.

        CMAKE_ARGS is always set, even empty: an exported CMAKE_ARGS=-DGGML_CUDA=on left in the shell
        must not turn a --cpu build back into a CUDA one.
        """
        return {"CMAKE_ARGS": self.cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(self.jobs), **self.extra_env}

    @property
    def pip_command(self) -> list[str]:
        # --no-cache-dir is the point of this command. pip caches the wheels it builds keyed by the
        # package's name and version only, never by CMAKE_ARGS; without it, a `--cuda` rebuild after a
        # CPU install quietly reinstalls the cached CPU wheel (no compile, no error, no GPU offload).
        # --no-binary forces the sdist (PyPI's wheel is CPU-only); --force-reinstall replaces the same
        # version; --no-deps leaves numpy & co alone; -v puts cmake/ninja's output in the log.
        return [self.python, "-m", "pip", "install", "--force-reinstall", "--no-cache-dir",
                "--no-binary", PACKAGE, "--no-deps", "-v", f"{PACKAGE}=={self.version}"]

    @property
    def verify_command(self) -> list[str]:
        # -I: no cwd or PYTHONPATH on sys.path, so this sees exactly what pip installed.
        return [self.python, "-I", "-c", PROBE]

    def describe(self) -> str:
        """The exact commands and environment, as a shell script (for --dry-run)."""
        target = sys.prefix if self.python == sys.executable else self.python
        lines = [f"# {self.kind} build of {PACKAGE} {self.version} into {target}"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        lines.append(shlex.join(self.pip_command))
        lines.append("# then, in a fresh interpreter: the version, GPU offload and ggml backends it came out with")
        lines.append(shlex.join(self.verify_command))
        return "\n".join(lines)


def default_jobs() -> int:
    return available_cpus()


# --- checks -------------------------------------------------------------------------------------------

_INSTALL_CUDA = ("Install the CUDA Toolkit (nvcc), e.g. `sudo apt install nvidia-cuda-toolkit` or NVIDIA's "
                 "cuda-toolkit-12-x package from developer.nvidia.com/cuda-downloads, or `conda install -c nvidia "
                 "cuda-toolkit`; then put its bin folder on PATH or set CUDA_HOME")
_INSTALL_DRIVER = ("Install the NVIDIA driver (e.g. `sudo ubuntu-drivers install` or `sudo apt install "
                   "nvidia-driver-570`) and check that `nvidia-smi` lists the GPU; in a container, start it with "
                   "the GPU passed through (`docker run --gpus all`)")


@dataclass
class Check:
    name: str
    detail: str


def find_nvcc(env: Mapping[str, str]) -> tuple[Path | None, list[str]]:
    """nvcc on PATH, else in $CUDA_HOME/bin (or $CUDA_PATH/bin), else in /usr/local/cuda/bin.

    A CUDA_HOME that is set replaces the /usr/local/cuda default rather than adding to it: it says
    which toolkit to use. Returns the path (or None) and the places looked in.
    """
    found = shutil.which("nvcc", path=env.get("PATH", ""))
    if found:
        return Path(found), ["PATH"]
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    folder = Path(home) / "bin" if home else Path("/usr/local/cuda/bin")
    looked = ["PATH", f"$CUDA_HOME/bin ({folder})" if home else str(folder)]
    candidate = folder / "nvcc"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate, looked
    return None, looked


def _run(cmd: list[str], env: Mapping[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=timeout)


def check_nvcc(env: Mapping[str, str]) -> tuple[Path, str]:
    nvcc, looked = find_nvcc(env)
    if nvcc is None:
        raise BuildError(f"--cuda needs nvcc, the CUDA compiler, and it was not found (looked in {', '.join(looked)})",
                         hint=f"{_INSTALL_CUDA}. Or build for the CPU with `ggufchat build --cpu`.")
    try:
        out = _run([str(nvcc), "--version"], env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"`{nvcc} --version` failed: {exc}", hint=f"Reinstall the CUDA Toolkit. {_INSTALL_CUDA}.") \
            from exc
    m = re.search(r"release (\d+\.\d+)", out.stdout)
    if out.returncode != 0 or not m:
        said = _last_line(out.stderr or out.stdout) or f"exit status {out.returncode}"
        raise BuildError(f"`{nvcc} --version` did not report a CUDA release ({said})",
                         hint=f"Reinstall the CUDA Toolkit. {_INSTALL_CUDA}.")
    return nvcc, m.group(1)


def check_driver(env: Mapping[str, str]) -> list[str]:
    """The GPUs nvidia-smi lists as `name, driver_version, memory.total`."""
    smi = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    if smi is None:
        raise BuildError("--cuda needs the NVIDIA driver and nvidia-smi was not found on PATH "
                         "(no driver installed, or no GPU passed to this container)",
                         hint=f"{_INSTALL_DRIVER}. Or build for the CPU with `ggufchat build --cpu`.")
    cmd = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        out = _run(cmd, env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"`nvidia-smi` failed: {exc}", hint=_INSTALL_DRIVER + ".") from exc
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not gpus:
        said = _last_line(out.stdout + "\n" + out.stderr) or f"exit status {out.returncode}"
        raise BuildError(f"nvidia-smi found no usable GPU ({said})", hint=_INSTALL_DRIVER + ".")
    return gpus


def find_cxx(env: Mapping[str, str]) -> str | None:
    path = env.get("PATH", "")
    if env.get("CXX"):
        return shutil.which(shlex.split(env["CXX"])[0], path=path)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def preflight(plan: BuildPlan, env: Mapping[str, str] | None = None) -> list[Check]:
    """Everything the build needs that pip cannot fetch by itself; raises BuildError naming what is missing.

    Sets plan.extra_env (CUDACXX) when nvcc is found outside PATH, since CMake only looks on PATH.
    """
    env = os.environ if env is None else env
    checks: list[Check] = []
    if not _has_pip(plan.python):
        raise BuildError(f"pip is not installed in {plan.python}'s environment",
                         hint=f"Run `{plan.python} -m ensurepip`, then retry.")
    cxx = find_cxx(env)
    if cxx is None:
        raise BuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++ on PATH)",
                         hint="Install one, e.g. `sudo apt install build-essential` (Debian/Ubuntu) or "
                              "`sudo dnf install gcc-c++`.")
    checks.append(Check("C++ compiler", cxx))
    # llama-cpp-python builds with scikit-build-core (its sdist's [build-system] requires only
    # scikit-build-core[pyproject]); pip's isolated build env gets cmake and ninja from PyPI when the
    # system has none or an older cmake than the 3.21 it asks for. So a missing cmake is only a note.
    cmake = shutil.which("cmake", path=env.get("PATH", ""))
    checks.append(Check("cmake", cmake or "not on PATH (pip fetches it from PyPI for the build)"))
    if plan.cuda:
        nvcc, release = check_nvcc(env)
        checks.append(Check("nvcc", f"CUDA {release} at {nvcc}"))
        if not shutil.which("nvcc", path=env.get("PATH", "")):
            plan.extra_env["CUDACXX"] = str(nvcc)
        for gpu in check_driver(env):
            checks.append(Check("GPU", gpu))
    return checks


def _has_pip(python: str) -> bool:
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("pip") is not None
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else ""


# --- running pip -------------------------------------------------------------------------------------

# ninja's `[12/345] Building CUDA object ...`, make's `[ 45%] Building ...`, and pip's own stages.
_PROGRESS = re.compile(r"^\s*(\[\s*\d+/\d+\]|\[\s*\d+%\])")
_STAGE = re.compile(r"^\s*(Collecting|Downloading|Building wheel|Building wheels|Created wheel|Installing|"
                    r"Successfully|\*\*\* |-- Configuring|-- Generating|-- Build files|-- The (C|CXX|CUDA) compiler)")


def meaningful(line: str) -> bool:
    """Whether a log line is worth showing as the build's progress."""
    return bool(_PROGRESS.match(line) or _STAGE.match(line))


def run_pip(plan: BuildPlan, log_path: Path, on_line: Callable[[str], None] | None = None,
            env: Mapping[str, str] | None = None) -> int:
    """Run the pip command, streaming every line into log_path (and to on_line); the exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**(os.environ if env is None else env), **plan.env}
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"# {plan.kind} build of {PACKAGE} {plan.version}\n")
        for k, v in plan.env.items():
            log.write(f"# {k}={v}\n")
        log.write(f"# {shlex.join(plan.pip_command)}\n")
        log.flush()
        proc = subprocess.Popen(plan.pip_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1, env=full_env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            return proc.wait()
        except BaseException:
            # Ctrl-C mid-build: stop pip too. pip uninstalls the old library only after the wheel is
            # built, so an interrupted build leaves the previous install working.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


# Lines that only say that something failed somewhere below them.
_PIP_NOISE = re.compile(r"subprocess-exited-with-error|Failed building wheel|failed-wheel-build|"
                        r"Failed to build|ERROR: Could not build wheels|^\s*(╰─>|note:|hint:|\|)", re.IGNORECASE)
_ERROR = re.compile(r"\berror\s*:|\bfatal\b|CMake Error|No CMAKE_\w+_COMPILER|Unsupported gpu architecture",
                    re.IGNORECASE)
_WEAK = re.compile(r"FAILED:|\bnot found\b|Could not find|\berror\b", re.IGNORECASE)


def key_error(lines: Iterable[str]) -> str:
    """The first line that says what actually went wrong, from the end of a failed build's log."""
    tail = [x.strip() for x in lines][-400:]
    for pattern in (_ERROR, _WEAK):
        for i, line in enumerate(tail):
            if line and pattern.search(line) and not _PIP_NOISE.search(line):
                if line.startswith("CMake Error"):  # `CMake Error at X:12 (message):` - the reason is below it
                    reason = next((x for x in tail[i + 1:i + 4] if x), "")
                    return f"{line} {reason}".strip()
                return line
    rest = [x for x in tail if x and not _PIP_NOISE.search(x)]
    return rest[-1] if rest else "no output"


def tail(path: Path, n: int = 20) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []


def failure(plan: BuildPlan, status: int, log_path: Path) -> BuildError:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    return BuildError(f"the {plan.kind} build of {PACKAGE} {plan.version} failed (pip exit status {status}): "
                      f"{key_error(lines)}",
                      hint=f"The full log is {log_path}. The previously installed {PACKAGE} is unchanged.")


# --- verification ------------------------------------------------------------------------------------

# Runs in a fresh interpreter: the calling process still has the old shared libraries loaded.
PROBE = """\
import json, llama_cpp
from ggufchat.engine import devices
info = devices.system_info()
print(json.dumps({
    "version": llama_cpp.__version__,
    "library": str(devices.library_folder()),
    "gpu_offload": info["gpu_offload"],
    "rpc": info["rpc"],
    "backends": devices.list_backends(),
    "devices": [d.description for d in devices.list_devices()],
    "system_info": info["system_info"],
}))
"""


@dataclass
class VerifyResult:
    version: str
    library: str
    gpu_offload: bool
    rpc: bool
    backends: list[str]
    devices: list[str]
    system_info: str

    @property
    def rpc_backend(self) -> bool:
        return self.rpc or "RPC" in self.backends


def verify(python: str | None = None, timeout: float = 120) -> VerifyResult:
    """Import llama_cpp in a fresh interpreter and report what it was built with."""
    cmd = [python or sys.executable, "-I", "-c", PROBE]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"could not check the installed {PACKAGE}: {exc}") from exc
    last = _last_line(out.stdout)
    if out.returncode != 0 or not last.startswith("{"):
        said = key_error((out.stderr or out.stdout).splitlines())
        raise BuildError(f"the installed {PACKAGE} does not import: {said}",
                         hint="Rebuild it (`ggufchat build --cpu` for a plain CPU build) and read the log.")
    data = json.loads(last)
    return VerifyResult(**{k: data[k] for k in VerifyResult.__dataclass_fields__})


def check_result(plan: BuildPlan, result: VerifyResult, log_path: Path | None) -> None:
    """Raise when the library that got installed is not the one asked for."""
    where = f" The build log is {log_path}." if log_path else ""
    if result.version != plan.version:
        raise BuildError(f"{PACKAGE} {result.version} is installed, not {plan.version}",
                         hint=f"Another {PACKAGE} shadows the one just built ({result.library}).{where}")
    if plan.cuda and "CUDA" not in result.backends:
        raise BuildError(f"the build came out CPU-only: {PACKAGE} {result.version} at {result.library} does not "
                         f"support GPU offload (backends: {', '.join(result.backends) or 'none'})",
                         hint="Check the log for `-- CUDA found` / `Including CUDA backend` and for an nvcc or "
                              f"architecture error; without --no-cache-dir pip would have reused a CPU wheel.{where}")
    if plan.rpc and not result.rpc_backend:
        raise BuildError(f"the build has no RPC backend (backends: {', '.join(result.backends) or 'none'})",
                         hint=f"Check the log for GGML_RPC.{where}")
