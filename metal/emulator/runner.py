"""Run the Metal source MLX generates for a kernel on the CPU, off a Mac.

1. `capture`: trace a call under mx.export_function with verbose=True; MLX prints the complete
   generated source (signature, attributes, template instantiation), read here at the fd level.
2. `build`: compile one or more captured sources, unchanged, against metal_shim.h with g++ into a
   driver binary (each source in its own namespace; binaries cached by content hash).
3. `run`: give the driver the input buffers and NaN-filled outputs, dispatch the grid on OS threads,
   read the outputs back. Every run has a timeout, so a deadlocked barrier fails instead of hanging.
4. `syntax_check`: clang -fsyntax-only with device/constant/threadgroup as distinct address spaces.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIM = "metal_shim.h"
RUN_TIMEOUT_S = 60
GXX_FLAGS = ["-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-attributes", "-Wno-unused-variable"]
CLANG_FLAGS = [
    "-target",
    "aarch64-linux-gnu",
    "-march=armv8.6-a+bf16",
    "-nostdinc",
    "-std=c++17",
    "-fsyntax-only",
    "-Wno-unknown-attributes",
    "-DMSHIM_ADDRESS_SPACES",
]


class EmulatorError(RuntimeError):
    """The generated source could not be captured, compiled or run."""


class EmulatorTimeout(EmulatorError):
    """A run did not finish in time (typically a barrier some threads never reach)."""


@dataclass(frozen=True)
class Param:
    type: str  # as written in the signature, e.g. "const device float16_t*"
    name: str
    attribute: str  # "buffer" or a thread attribute such as "thread_index_in_simdgroup"
    slot: int = -1  # buffer index


@dataclass(frozen=True)
class GeneratedKernel:
    name: str
    source: str  # exactly as MLX printed it
    params: tuple[Param, ...]
    call: str  # the instantiated template, e.g. "custom_kernel_x<float16_t, 64>"

    @property
    def buffers(self) -> list[Param]:
        return sorted((p for p in self.params if p.attribute == "buffer"), key=lambda p: p.slot)

    @property
    def outputs(self) -> list[Param]:
        return [p for p in self.buffers if not p.type.startswith("const")]

    def element_type(self, name: str) -> str:
        param = next(p for p in self.params if p.name == name)
        words = param.type.replace("*", " ").replace("&", " ").split()
        return next(w for w in reversed(words) if w not in ("const", "device", "constant"))


_BLOCK = re.compile(r"Generated source code for `(?P<name>[^`]+)`:\n```\n(?P<src>.*?)\n```", re.S)
_SIGNATURE = re.compile(r"\[\[kernel\]\] void (?P<fn>\w+)\(\n(?P<params>.*?)\) \{\n", re.S)
_PARAM = re.compile(r"^\s*(?P<type>.*[\s*&])(?P<name>\w+) \[\[(?P<attr>\w+)(?:\((?P<slot>\d+)\))?\]\]$")
_CALL = re.compile(r"\[\[kernel\]\] decltype\((?P<call>[^()]*)\)")
_THREADGROUP_POINTER = re.compile(r"\bthreadgroup\s+[\w:<>, ]+\*")


def _parse(name: str, source: str) -> GeneratedKernel:
    sig, call = _SIGNATURE.search(source), _CALL.search(source)
    if sig is None:
        raise EmulatorError(f"kernel {name}: generated source has no recognisable kernel signature")
    params = []
    for line in sig["params"].splitlines():
        m = _PARAM.match(line.rstrip(","))
        if m is None:
            raise EmulatorError(f"kernel {name}: cannot parse signature line {line.strip()!r}")
        params.append(Param(m["type"].strip(), m["name"], m["attr"], int(m["slot"] or -1)))
    if _THREADGROUP_POINTER.search(source):
        raise EmulatorError(f"kernel {name}: `threadgroup T*` pointers are not supported by {SHIM}")
    # A kernel without template parameters has no explicit instantiation; it is called by name.
    return GeneratedKernel(name, source, tuple(params), call["call"] if call else sig["fn"])


def capture(fn, *arrays: mx.array) -> list[GeneratedKernel]:
    """Sources of the kernels `fn(*arrays)` launches, as MLX generates them.

    `fn` must call its kernels with verbose=True; tracing under export_function does not need a
    Metal device, and MLX prints each source to the process's stdout (C++ streams), hence fd 1.
    """
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as sink:
        saved = os.dup(1)
        os.dup2(sink.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "trace.mlxfn"), fn, *arrays)
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        text = sink.read().decode()
    found = [_parse(m["name"], m["src"]) for m in _BLOCK.finditer(text)]
    if not found:
        raise EmulatorError("no generated kernel source was printed (was verbose=True passed?)")
    return found


def shim_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath(SHIM))).parent


def _namespaced(kernels: list[GeneratedKernel], source_of) -> str:
    parts = [f'#include "{SHIM}"\n']
    for i, k in enumerate(kernels):
        parts.append(f"namespace k{i} {{\n{source_of(k)}\n}}  // namespace k{i}\n")
    return "\n".join(parts)


def _argument(p: Param) -> str:
    if p.attribute != "buffer":
        return f"ids.{p.attribute}"
    if p.type.endswith("&"):
        return f"*reinterpret_cast<{p.type[:-1].strip()}*>(b[{p.slot}].data())"
    return f"reinterpret_cast<{p.type}>(b[{p.slot}].data())"


def driver_source(kernels: list[GeneratedKernel]) -> str:
    """C++ for a binary that runs kernel i: `driver i DIR gx gy gz tx ty tz` (buffers DIR/<slot>.bin)."""
    text = [_namespaced(kernels, lambda k: k.source), "using Buffers = std::vector<std::vector<unsigned char>>;"]
    for i, k in enumerate(kernels):
        args = ",\n        ".join(_argument(p) for p in k.params)
        text.append(
            f"static void launch_{i}(Buffers& b, uint3 grid, uint3 group) {{\n"
            f"  mshim::dispatch_threads(grid, group, [&](const mshim::Ids& ids) {{\n"
            f"    k{i}::{k.call}(\n        {args});\n  }});\n}}"
        )
    table = ", ".join(
        f"{{launch_{i}, {len(k.buffers)}, {{{', '.join(str(p.slot) for p in k.outputs)}}}}}"
        for i, k in enumerate(kernels)
    )
    text.append(f"""
#undef device
#undef constant
#undef threadgroup
#undef thread
struct Entry {{ void (*launch)(Buffers&, uint3, uint3); int buffers; std::vector<int> outputs; }};
static const std::vector<Entry> kEntries = {{{table}}};

int main(int argc, char** argv) {{
  if (argc != 10) {{ std::fprintf(stderr, "usage: driver KERNEL DIR gx gy gz tx ty tz TIMEOUT\\n"); return 2; }}
  const Entry& e = kEntries.at(std::atoi(argv[1]));
  alarm(unsigned(std::atoi(argv[9])));  // a deadlocked barrier ends the process
  std::string dir = argv[2];
  Buffers b(e.buffers);
  for (int i = 0; i < e.buffers; i++) {{
    FILE* f = std::fopen((dir + "/" + std::to_string(i) + ".bin").c_str(), "rb");
    if (!f) {{ std::fprintf(stderr, "missing buffer %d\\n", i); return 2; }}
    std::fseek(f, 0, SEEK_END);
    b[i].resize(std::size_t(std::ftell(f)));
    std::fseek(f, 0, SEEK_SET);
    if (std::fread(b[i].data(), 1, b[i].size(), f) != b[i].size()) return 2;
    std::fclose(f);
  }}
  uint3 grid(std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]));
  uint3 group(std::atoi(argv[6]), std::atoi(argv[7]), std::atoi(argv[8]));
  e.launch(b, grid, group);
  for (int i : e.outputs) {{
    FILE* f = std::fopen((dir + "/" + std::to_string(i) + ".out").c_str(), "wb");
    std::fwrite(b[i].data(), 1, b[i].size(), f);
    std::fclose(f);
  }}
  return 0;
}}
""")
    return "\n".join(text)


def build(kernels: list[GeneratedKernel], cache_dir: str | os.PathLike, timeout: float = 300) -> Path:
    """Compile the driver for `kernels` with g++ (cached by content) and return the binary's path."""
    source = driver_source(kernels)
    shim = (shim_dir() / SHIM).read_text()
    digest = hashlib.sha256("\0".join([source, shim, *GXX_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(cache_dir)
    binary = cache / f"emu-{digest}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    cpp = cache / f"emu-{digest}.cpp"
    cpp.write_text(source)
    tmp = cache / f"emu-{digest}.tmp{os.getpid()}"
    proc = subprocess.run(
        ["g++", *GXX_FLAGS, "-I", str(shim_dir()), str(cpp), "-o", str(tmp)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise EmulatorError(f"g++ failed on {cpp}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, binary)
    return binary


def syntax_check(kernels: list[GeneratedKernel], work_dir: str | os.PathLike, timeout: float = 120) -> None:
    """clang -fsyntax-only with distinct device/constant/threadgroup address spaces; raises on errors.

    Upstream clang (unlike Apple's Metal compiler) rejects attribute lists on an explicit
    instantiation, so only those two lists are dropped from the generated instantiation line.
    """
    clang = shutil.which("clang++") or shutil.which("clang")
    if clang is None:
        raise EmulatorError("clang is not installed (apt-get install clang)")
    strip = re.compile(r"^template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\] ", re.M)

    def for_clang(k: GeneratedKernel) -> str:
        text, n = strip.subn("template ", k.source)
        expected = int("<" in k.call)  # template kernels end with one explicit instantiation
        if n != expected:
            raise EmulatorError(f"kernel {k.name}: expected {expected} explicit instantiation(s), found {n}")
        return text

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    path = Path(work_dir) / "syntax_check.cpp"
    path.write_text(_namespaced(kernels, for_clang))
    cmd = [clang, "-x", "c++", *CLANG_FLAGS, "-I", str(shim_dir()), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise EmulatorError(f"clang address-space check failed on {path}:\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------- buffers in and out

_NAN_BITS = {
    "float": np.uint32(0x7FC00000),
    "float16_t": np.uint16(0x7E00),
    "half": np.uint16(0x7E00),
    "bfloat16_t": np.uint16(0x7FC0),
}
_DECODE = {"float": np.float32, "float16_t": np.float16, "half": np.float16}


def raw_bytes(a: mx.array) -> bytes:
    """The array's row-major bytes, as the kernel sees them after MLX's contiguity copy."""
    unsigned = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.itemsize]
    return np.array(mx.view(mx.contiguous(a), unsigned)).tobytes()


def _decode(raw: bytes, element: str, shape: tuple[int, ...]) -> np.ndarray:
    if element == "bfloat16_t":
        bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
        values = bits.view(np.float32)
    elif element in _DECODE:
        values = np.frombuffer(raw, _DECODE[element])
    else:
        raise EmulatorError(f"output element type {element} is not decoded by the harness")
    return values.astype(np.float64).reshape(shape)


def run(
    binary: Path,
    index: int,
    kernel: GeneratedKernel,
    grid,
    threadgroup,
    inputs: dict[str, mx.array],
    output_shapes: dict[str, tuple[int, ...]],
    timeout: float = RUN_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Dispatch kernel `index` of `binary` over `grid` threads; outputs start as NaN, come back float64."""
    with tempfile.TemporaryDirectory() as job:
        for p in kernel.buffers:
            if p in kernel.outputs:
                element = kernel.element_type(p.name)
                count = int(np.prod(output_shapes[p.name]))
                data = np.full(count, _NAN_BITS[element]).tobytes()
            elif p.name in inputs:
                data = raw_bytes(inputs[p.name])
            else:
                data = _shape_info(p, inputs)
            Path(job, f"{p.slot}.bin").write_bytes(data)
        cmd = [str(binary), str(index), job, *map(str, grid), *map(str, threadgroup), str(int(timeout) + 5)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise EmulatorTimeout(f"kernel {kernel.name} did not finish in {timeout} s (deadlock?)") from e
        if proc.returncode != 0:
            raise EmulatorError(f"kernel {kernel.name} run failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        return {
            p.name: _decode(Path(job, f"{p.slot}.out").read_bytes(), kernel.element_type(p.name), output_shapes[p.name])
            for p in kernel.outputs
        }


def _shape_info(p: Param, inputs: dict[str, mx.array]) -> bytes:
    """x_shape / x_strides / x_ndim buffers MLX adds when a kernel names them (row-contiguous input)."""
    for suffix, make in (
        ("_shape", lambda a: np.array(a.shape, np.int32)),
        ("_strides", lambda a: np.array(_row_strides(a.shape), np.int64)),
        ("_ndim", lambda a: np.array(a.ndim, np.int32)),
    ):
        if p.name.endswith(suffix) and p.name[: -len(suffix)] in inputs:
            return make(inputs[p.name[: -len(suffix)]]).tobytes()
    raise EmulatorError(f"no data for kernel parameter {p.name}")


def _row_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]
