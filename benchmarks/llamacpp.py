"""llama.cpp for the benchmarks: built once from the source that the llama-cpp-python sdist vendors.

    python benchmarks/llamacpp.py [--llama-cpp-sdist PATH]     # build (once) and print what was found

`find_or_build()` returns a `LlamaCpp` (the `llama-server` binary, the folder of llama.cpp's shared
libraries, the Python bindings, the version) or None, having printed one line saying why:

1. the sdist: `--llama-cpp-sdist PATH` or $STORYGPT_LLAMA_CPP_SDIST (its unpacked folder or its .tar.gz),
   else `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION` into the cache;
2. its `vendor/llama.cpp` is built with cmake (Release, shared libraries, -march=native through
   GGML_NATIVE, the `llama-server` target, no web UI, no download at build time) into
   $STORYGPT_CACHE/llama.cpp/VERSION (default ~/.cache/storygpt/llama.cpp/VERSION), once: a finished
   build leaves `llamacpp.json` there and is reused as it is;
3. the bindings are the sdist installed with `pip install --no-deps --target` and CMAKE_ARGS
   "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" (so llama.cpp is not compiled a second time) into that folder,
   with `diskcache` (which they import); `LlamaCpp.llama_cpp()` imports them with LLAMA_CPP_LIB_PATH
   pointing at the build's libraries. The venv is left as it is.

No cmake or no C/C++ compiler: None. `build=False` (the benchmarks' --smoke runs) only looks in the cache.
The sdist's checkout of llama.cpp is one commit deep, so llama.cpp's release number (bNNNN) is unknown
(`llama-server --version` says "build 1"); its commit is read from that checkout (or the sdist's CHANGELOG)
and compiled in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, the sdist whose vendored llama.cpp is built
SDIST_ENV = "STORYGPT_LLAMA_CPP_SDIST"
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]


@dataclass
class LlamaCpp:
    folder: Path  # the cache folder of this version
    server: Path  # the llama-server binary
    lib: Path  # libllama.so, libggml*.so
    python: Path  # the llama_cpp package's parent folder
    commit: str  # llama.cpp's commit (full hash, or "unknown")
    version: str  # one line: llama.cpp's commit, the sdist's version, the build's flags

    def llama_cpp(self):
        """The `llama_cpp` module (llama-cpp-python), on this build's libraries."""
        os.environ["LLAMA_CPP_LIB_PATH"] = str(self.lib)
        if str(self.python) not in sys.path:
            sys.path.insert(0, str(self.python))
        import llama_cpp

        return llama_cpp

    def env(self) -> dict[str, str]:
        """The environment for a process that imports llama_cpp (tests, other scripts)."""
        return {"LLAMA_CPP_LIB_PATH": str(self.lib), "PYTHONPATH": str(self.python)}


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    if cache is not None:
        return Path(cache).expanduser()
    base = os.environ.get("STORYGPT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "storygpt") / "llama.cpp"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp's rows out")
    ap.add_argument("--llama-cpp-sdist", default=None, metavar="PATH",
                    help=f"the llama-cpp-python {VERSION} sdist (folder or .tar.gz) whose llama.cpp is built "
                         f"(default: ${SDIST_ENV}, else pip download; the build is cached)")


def from_args(args, build: bool = True) -> LlamaCpp | None:
    """The benchmarks' way in: None (one line printed) with --no-llama-cpp."""
    if args.no_llama_cpp:
        print("llama.cpp: skipped (--no-llama-cpp)")
        return None
    return find_or_build(args.llama_cpp_sdist, build=build)


def find_or_build(sdist: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                  build: bool = True) -> LlamaCpp | None:
    """The cached build of llama.cpp, built first if it is not there (see the module docstring)."""
    folder = cache_root(cache) / VERSION
    found = _cached(folder)
    if found or not build:
        if not found:
            print(f"llama.cpp: skipped (not built in {folder}; a full run builds it)")
        return found
    missing = [tool for tool, names in (("cmake", ["cmake"]), ("C compiler", ["cc", "gcc", "clang"]),
                                        ("C++ compiler", ["c++", "g++", "clang++"]))
               if not any(shutil.which(n) for n in names)]
    if missing:
        print(f"llama.cpp: skipped (no {', no '.join(missing)} on PATH to build it)")
        return None
    try:
        source = _sdist(sdist or os.environ.get(SDIST_ENV), folder)
        commit = _commit(source)
        _bindings(source, folder / "python")  # first: quick, and it fails fast where PyPI is out of reach
        _build(source / "vendor" / "llama.cpp", folder / "build", commit)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        print(f"llama.cpp: skipped (the build failed: {_why(e)}; see {folder})")
        return None
    server = subprocess.run([str(folder / "build" / "bin" / "llama-server"), "--version"], capture_output=True,
                            text=True, timeout=60)
    said = re.search(r"version: (\S+)", server.stdout + server.stderr)
    info = {"sdist": VERSION, "commit": commit, "server": "build/bin/llama-server", "lib": "build/bin",
            "python": "python", "libllama": said.group(1) if said else "unknown", "flags": _flags(folder / "build")}
    (folder / "llamacpp.json").write_text(json.dumps(info, indent=2) + "\n")
    found = _cached(folder)
    if found is None:
        print(f"llama.cpp: skipped (built, but llama-server or the bindings do not run; see {folder})")
    return found


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------
def _cached(folder: Path) -> LlamaCpp | None:
    try:
        info = json.loads((folder / "llamacpp.json").read_text())
    except (OSError, ValueError):
        return None
    found = LlamaCpp(folder, folder / info["server"], folder / info["lib"], folder / info["python"], info["commit"],
                     f"llama.cpp {info['commit'][:9]} (libllama {info.get('libllama', 'unknown')}, the source "
                     f"llama-cpp-python {info['sdist']} vendors; its one-commit checkout has no release number), "
                     f"{info['flags']}")
    if not (found.server.is_file() and (found.lib / "libllama.so").is_file() and (found.python / "llama_cpp").is_dir()):
        return None
    return found


def _sdist(given: str | None, folder: Path) -> Path:
    """The unpacked sdist: the folder given, a .tar.gz given (unpacked into the cache), or pip's download."""
    if given and Path(given).expanduser().is_dir():
        source = Path(given).expanduser().resolve()
    else:
        archive = Path(given).expanduser() if given else None
        download = folder / "download"
        if archive is None and list(download.glob("llama_cpp_python-*.tar.gz")):
            archive = next(download.glob("llama_cpp_python-*.tar.gz"))  # downloaded by an earlier, unfinished build
        if archive is None:
            download.mkdir(parents=True, exist_ok=True)
            print(f"llama.cpp: pip download llama-cpp-python=={VERSION} (sdist) into {download}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(download)], check=True)
            archive = next(download.glob("llama_cpp_python-*.tar.gz"))
        unpacked = folder / "src"
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        source = next(unpacked.iterdir())
    if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{source} is not a llama-cpp-python sdist (no vendor/llama.cpp)")
    found = re.search(r'__version__ = "([^"]+)"', (source / "llama_cpp" / "__init__.py").read_text())
    if not found or found.group(1) != VERSION:
        raise RuntimeError(f"{source} is llama-cpp-python {found and found.group(1)}, not {VERSION}")
    return source


def _commit(source: Path) -> str:
    """llama.cpp's commit: the vendored checkout's HEAD, else the sdist's CHANGELOG line for its version."""
    head = subprocess.run(["git", "-C", str(source / "vendor" / "llama.cpp"), "rev-parse", "HEAD"],
                          capture_output=True, text=True) if shutil.which("git") else None
    if head is not None and head.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip()):
        return head.stdout.strip()
    changelog = (source / "CHANGELOG.md").read_text()
    entry = changelog.split(f"## [{VERSION}]", 1)[-1].split("\n## [", 1)[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", entry)
    return found.group(1) if found else "unknown"


def _build(llama: Path, build: Path, commit: str) -> None:
    print(f"llama.cpp: building {commit[:9]} (llama-server, shared libraries) into {build}; once, minutes",
          flush=True)
    log = build.parent / "build.log"
    configured = build / "CMakeCache.txt"
    if configured.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={llama}\n" not in configured.read_text():
        shutil.rmtree(build)  # configured from another copy of the source: cmake refuses to reuse it
    build.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        for cmd in (["cmake", "-S", str(llama), "-B", str(build), *CMAKE_OPTIONS, f"-DLLAMA_BUILD_COMMIT={commit[:9]}"],
                    ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)]):
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{cmd[0]} {cmd[1]} failed, log in {log}")


def _bindings(source: Path, target: Path) -> None:
    """llama-cpp-python's Python package without its libraries (they are the build's)."""
    shutil.rmtree(target, ignore_errors=True)
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target",
                    str(target), str(source), "diskcache>=5.6.1"], check=True, env=env, stdout=subprocess.DEVNULL)


def _flags(build: Path) -> str:
    """The CPU features ggml was compiled for (from cmake's cache: GGML_NATIVE detects them)."""
    cache = (build / "CMakeCache.txt").read_text()
    march = "-march=native" if re.search(r"^GGML_NATIVE:BOOL=ON", cache, re.M) else "generic"
    openmp = "OpenMP" if re.search(r"^GGML_OPENMP:BOOL=ON", cache, re.M) else "no OpenMP"
    return f"{march}, {openmp}, shared libraries"


def _why(e: Exception) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"{' '.join(map(str, e.cmd[:4]))}... exited {e.returncode}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def check(found: LlamaCpp) -> str:
    """Run both halves: `llama-server --version` and the bindings' system info (a real load is the
    benchmarks' job). Returns the system info line."""
    server = subprocess.run([str(found.server), "--version"], capture_output=True, text=True, timeout=60)
    if server.returncode:
        raise RuntimeError(f"llama-server --version exited {server.returncode}: {server.stderr.strip()[-300:]}")
    return found.llama_cpp().llama_print_system_info().decode().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--cache", default=None, help="the cache folder (default: $STORYGPT_CACHE/llama.cpp or "
                                                   "~/.cache/storygpt/llama.cpp)")
    args = ap.parse_args()
    found = None if args.no_llama_cpp else find_or_build(args.llama_cpp_sdist, args.cache)
    if found is None:
        raise SystemExit(1)
    print(found.version)
    print(f"llama-server: {found.server}\nlibraries: {found.lib}\nbindings: {found.python}")
    print(f"system info: {check(found)}")


if __name__ == "__main__":
    main()
