"""gram's per-σ passes as one compiled pass (``--fused``; ``fused.c`` holds the kernel and its
formula): each block of 256 columns of the two products is read once for every σ of the grid,
and only block totals are kept, where the torch passes write and read B×N weights four times
per σ (docs/benchmarks.md: the per-σ passes are memory-bound).

The source is compiled at first use with the system's C compiler (``$CC``, else ``cc``;
``-O3 -march=native``) into ``$LOSSFLOOR_CACHE/fused/`` under a hash of the source, the
compiler's version, the flags and the CPU's flags (a copied cache never runs code built for
another CPU), written atomically; ``compile_seconds()`` is the last compile's time in this
process (0 where the cache had it). No compiler: one line (``UserError``).

The values equal the torch passes' up to rounding: exp2 is a Taylor polynomial of degree 7
(float32) or 12 (float64) on [−½, ½] (truncation below 6e-9 and 2e-16 relative), the sums run
in another order; a draw whose uniform falls within that rounding of a column's cumulative
edge picks the neighbouring column (tests/test_gram_fused.py bounds each).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lossfloor.errors import UserError

Tensor = torch.Tensor

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
#: Draws per task of the thread pool (each a pass over N columns for every σ); bags per task.
ROWS_PER_TASK = 2
BAGS_PER_TASK = 64

_LIBRARY: list[ctypes.CDLL] = []
_COMPILE_SECONDS: list[float] = [0.0]
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise UserError(
            f"--fused compiles a C kernel at first use and finds no C compiler ({cc}): install "
            "one (Debian: gcc) or set CC, or leave out --fused"
        )
    return cc


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native builds for): /proc/cpuinfo's first 'flags'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _library_path(cc: str) -> Path:
    from lossfloor.data.cache import cache_dir

    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / "fused" / f"gram-{key}.so"


def _compile(cc: str, target: Path) -> None:
    from lossfloor.io import atomic_path

    start = time.perf_counter()
    with atomic_path(target) as tmp:
        done = subprocess.run(
            [cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True
        )
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            first = next((x for x in lines if "error" in x), lines[0])
            raise UserError(f"--fused: {cc} could not compile {SOURCE.name}: {first}")
    _COMPILE_SECONDS[0] = time.perf_counter() - start


def library() -> ctypes.CDLL:
    """The compiled kernel, loaded once per process (compiled first where the cache lacks it)."""
    if not _LIBRARY:
        cc = _compiler()
        path = _library_path(cc)
        _COMPILE_SECONDS[0] = 0.0
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
        for name in ("gram", "bags"):
            for suffix in ("f32", "f64"):
                getattr(lib, f"lossfloor_{name}_{suffix}").restype = ctypes.c_int
        _LIBRARY.append(lib)
    return _LIBRARY[0]


def compile_seconds() -> float:
    """The seconds this process spent compiling the kernel (0 where the cache held it)."""
    return _COMPILE_SECONDS[0]


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads)
    return _POOLS[threads]


def source_split(
    a: Tensor,
    e: Tensor,
    n: int,
    src: Tensor,
    sigmas: Sequence[float],
    draws: Tensor,
    tilt: tuple[Tensor, Tensor] | None,
    lo: float,
    hi: float,
    negligible: float,
    threads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """gram's ``_source_split`` for every σ at once: (the source's weight, the rest's total:
    S×B float64; L draws from the rest: S×B×L columns, −1 where the rest's share
    rest/(own + rest) is at most ``negligible``: no draws made) from the products
    a = x0·Xᵀ − ½‖X‖², e = ε·Xᵀ (B×width, columns 0..n the points), the sources ``src`` (B),
    the uniforms ``draws`` (S×B×L in (0, 1]), the tilted draws' (products, rows) or None, and
    the exponent's clamp [lo, hi]; rows split over ``threads`` threads (the kernel runs
    without the GIL)."""
    kernel = {torch.float32: "lossfloor_gram_f32", torch.float64: "lossfloor_gram_f64"}
    fn = getattr(library(), kernel[a.dtype])
    b, width = a.shape
    s, big = draws.shape[0], draws.shape[2]
    a, e, draws = a.contiguous(), e.contiguous(), draws.to(a.dtype).contiguous()
    src = src.to(torch.int64).contiguous()
    sig = torch.tensor(list(sigmas), dtype=torch.float64)
    own = torch.empty(s, b, dtype=torch.float64)
    rest = torch.empty(s, b, dtype=torch.float64)
    pick = torch.empty(s, b, big, dtype=torch.int64)
    if tilt is None:
        products, rows, ldp = None, None, 0
    else:
        products, rows = tilt[0].to(a.dtype).contiguous(), tilt[1].to(torch.int64).contiguous()
        ldp = products.shape[1]
    ptr = ctypes.c_void_p

    def run(r0: int, r1: int) -> int:
        return fn(
            ptr(a.data_ptr()), ptr(e.data_ptr()), ctypes.c_int64(width), ctypes.c_int64(n),
            ctypes.c_int64(b), ctypes.c_int64(r0), ctypes.c_int64(r1), ptr(src.data_ptr()),
            ctypes.c_int64(s), ptr(sig.data_ptr()), ptr(draws.data_ptr()), ctypes.c_int64(big),
            ptr(None if products is None else products.data_ptr()), ctypes.c_int64(ldp),
            ptr(None if rows is None else rows.data_ptr()), ctypes.c_double(lo),
            ctypes.c_double(hi), ctypes.c_double(negligible), ptr(own.data_ptr()),
            ptr(rest.data_ptr()), ptr(pick.data_ptr()),
        )  # fmt: skip

    _spread(run, b, ROWS_PER_TASK, threads)
    return own, rest, pick


def bag_moments(x: Tensor, sq: Tensor, idx: Tensor, centres: Tensor, threads: int) -> Tensor:
    """Per bag r of rows of x (N×D; ``sq`` their ‖x‖²) ``idx[r]`` (R×L) with centre row
    c = ``centres[r]``: [Σ‖x_j‖², x_c·Σx_j, ‖Σx_j‖², Σ‖x_j − x_c‖², ‖Σ(x_j − x_c)‖²] (R×5,
    float64; Σx_j summed in x's dtype, the rest in float64; ``fused.c``), in ``threads``
    threads."""
    kernel = {torch.float32: "lossfloor_bags_f32", torch.float64: "lossfloor_bags_f64"}
    fn = getattr(library(), kernel[x.dtype])
    x, sq = x.contiguous(), sq.to(x.dtype).contiguous()
    idx, centres = idx.to(torch.int64).contiguous(), centres.to(torch.int64).contiguous()
    r, big = idx.shape
    out = torch.empty(r, 5, dtype=torch.float64)
    ptr = ctypes.c_void_p

    def run(r0: int, r1: int) -> int:
        return fn(
            ptr(x.data_ptr()), ptr(sq.data_ptr()), ctypes.c_int64(x.shape[1]),
            ptr(idx.data_ptr()), ptr(centres.data_ptr()), ctypes.c_int64(r0),
            ctypes.c_int64(r1), ctypes.c_int64(big), ptr(out.data_ptr()),
        )  # fmt: skip

    _spread(run, r, BAGS_PER_TASK, threads)
    return out


def _spread(run: Callable[[int, int], int], rows: int, per_task: int, threads: int) -> None:
    """``run(r0, r1)`` over [0, rows) in spans of ``per_task`` rows, on ``threads`` threads
    (the kernels run without the GIL); a nonzero return (memory ran out) raises."""
    spans = [(r0, min(rows, r0 + per_task)) for r0 in range(0, rows, per_task)]
    if threads <= 1 or len(spans) == 1:
        codes = [run(r0, r1) for r0, r1 in spans]
    else:
        codes = list(_pool(threads).map(lambda span: run(*span), spans))
    if any(codes):
        raise MemoryError("a fused gram kernel could not allocate its buffers")
