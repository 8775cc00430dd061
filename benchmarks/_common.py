"""Shared helpers of the benchmark scripts: fresh-process workers, peak memory, timing, tables.

Every configuration of a benchmark runs in a fresh Python process (``run_worker``), so that
its peak memory is its own: the worker resets the kernel's high-water mark of its resident set
(``echo 5 > /proc/self/clear_refs``) once the model is loaded, and reads ``VmHWM`` from
``/proc/self/status`` after the run. On CUDA, ``torch.cuda.max_memory_allocated`` is reported
as well. These are Linux facilities; elsewhere the memory columns read ``n/a``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyperfeatures.runtime import tune_glibc_malloc

__all__ = [
    "MARKER",
    "MemoryProbe",
    "Timing",
    "benchmark_parser",
    "cuda_sync",
    "format_bytes",
    "format_seconds",
    "markdown_table",
    "parse_csv",
    "parse_device",
    "run_worker",
    "runtime_header",
    "time_repeats",
    "tune_glibc_malloc",
    "worker_main",
    "write_json",
]

MARKER = "@@BENCH_RESULT@@ "
"""Prefix of the one stdout line that carries a worker's JSON result."""


# ----------------------------------------------------------------------------- command line
def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark script shares (device, dtype, sizes, extrapolation,
    threads, allocator, JSON output, per-row timeout, and the hidden worker entry)."""
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--load-size", type=int, default=224, help="input image size (px)")
    parser.add_argument("--sd-size", type=int, default=512, help="VAE size for real models")
    parser.add_argument(
        "--max-calls",
        type=int,
        default=0,
        help="time only the first K UNet calls of longer chains and extrapolate (0 = all)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="glibc keeps freed memory in every run (no page-fault churn)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write JSON (- = stdout)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- memory
def _status_kib(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in KiB, ``None`` where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size in bytes (``VmRSS``)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since start or the last reset, in bytes (``VmHWM``)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False when the
    kernel does not allow it (the peak then includes everything since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to map)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cuda_sync(device: torch.device) -> None:
    """Wait for queued CUDA work (timings on GPU need it); no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MemoryProbe:
    """Peak memory of a code region: RSS high-water mark (reset at :meth:`start`) and, on CUDA,
    ``max_memory_allocated``.

    Attributes (after :meth:`stop`):
        base_rss: RSS at start (bytes), e.g. the loaded model.
        peak_rss: peak RSS during the region (bytes, absolute).
        extra_rss: ``peak_rss - base_rss``: what the region itself needed.
        peak_cuda: peak CUDA memory allocated during the region (bytes) or None.
        faults: minor page faults during the region.
        reset_ok: whether the high-water mark could be reset (else the peak covers the whole
            process lifetime).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    base_rss: int | None = None
    peak_rss: int | None = None
    extra_rss: int | None = None
    peak_cuda: int | None = None
    faults: int = 0
    reset_ok: bool = False
    _faults0: int = 0

    def start(self) -> MemoryProbe:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.reset_ok = reset_peak_rss()
        self.base_rss = rss_bytes()
        self._faults0 = minor_faults()
        return self

    def restart_faults(self) -> None:
        """Count page faults from here on (e.g. after a warm-up inside the probed region)."""
        self._faults0 = minor_faults()

    def stop(self) -> MemoryProbe:
        cuda_sync(self.device)
        self.faults = minor_faults() - self._faults0
        self.peak_rss = peak_rss_bytes()
        if self.peak_rss is not None and self.base_rss is not None:
            self.extra_rss = max(0, self.peak_rss - self.base_rss)
        if self.device.type == "cuda":
            self.peak_cuda = int(torch.cuda.max_memory_allocated(self.device))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "base_rss": self.base_rss,
            "peak_rss": self.peak_rss,
            "extra_rss": self.extra_rss,
            "peak_cuda": self.peak_cuda,
            "minor_faults": self.faults,
            "rss_reset": self.reset_ok,
        }


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall-clock seconds of repeated runs."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "median": self.median, "best": self.best}


def time_repeats(fn: Callable[[], Any], repeats: int, device: torch.device) -> Timing:
    """Run ``fn`` ``repeats`` times; wall-clock seconds of each run (CUDA synchronised)."""
    runs = []
    for _ in range(max(1, repeats)):
        cuda_sync(device)
        t0 = time.perf_counter()
        fn()
        cuda_sync(device)
        runs.append(time.perf_counter() - t0)
    return Timing(runs)


# ----------------------------------------------------------------------------- baselines
@torch.no_grad()
def plain_inversion_loop(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    cond: Any,
    schedule: Any,
    num_steps: int,
    calls: int,
) -> torch.Tensor:
    """The baseline of the speed benchmarks: ``calls`` UNet calls of a ``num_steps`` DDIM
    inversion of ``latents`` (``(B, 4, h, w)``), the UNet called as a plain diffusers loop
    would call it (``unet(x, t, ...).sample``, no taps), DDIM moves between calls. Returns the
    last latent."""
    from hyperfeatures.sources.diffusion import ddim_grid, ddim_move, inversion_timesteps

    times, nexts = inversion_timesteps(num_steps), ddim_grid(num_steps)
    x = latents.float()
    for i in range(calls):
        t = torch.full((x.shape[0],), times[i], device=x.device, dtype=torch.long)
        eps = unet(x, t, **cond.unet_kwargs()).sample.float()
        x = ddim_move(x, eps, schedule.alpha_bar(times[i]), schedule.alpha_bar(nexts[i]))
    return x


def descriptor_agreement(desc: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(cosine, max |desc - ref| / max |ref|)`` of two descriptor tensors, in float64."""
    a, b = desc.double().flatten(), ref.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    return cos, float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- workers
def run_worker(script: str | Path, config: dict[str, Any], *, timeout: float | None = None) -> dict:
    """Run ``script --worker JSON`` in a fresh Python process and return its JSON result.

    The worker prints progress on stderr (passed through) and its result as one stdout line
    starting with :data:`MARKER`. A failed worker gives ``{"error": "..."}`` instead of raising,
    so one broken configuration does not lose the others.
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = proc.stdout.strip().splitlines()[-3:]
    return {"error": f"worker exited with code {proc.returncode}; stdout tail: {tail}"}


def worker_main(fn: Callable[[dict[str, Any]], dict[str, Any]], config_json: str) -> None:
    """Body of a worker process: run ``fn(config)`` and print its result line."""
    config = json.loads(config_json)
    if config.get("tuned_malloc"):
        config["tuned_malloc"] = tune_glibc_malloc()
    try:
        result = fn(config)
    except Exception as err:  # reported in the table, not as a traceback in the parent
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"}
    print(MARKER + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parsing
def parse_csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """``"a,b,c"`` -> ``[cast(a), cast(b), cast(c)]`` (blank items dropped)."""
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def parse_device(text: str | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(text)``."""
    if text in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: CUDA is not available on this machine")
    return device


# ----------------------------------------------------------------------------- output
def format_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> 'n/a'``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def runtime_header(device: torch.device, dtype: str) -> str:
    """One line describing where the numbers were taken."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f}"
    return (
        f"torch {torch.__version__}, device {device} ({where}), dtype {dtype}, "
        f"{torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs{load}"
    )


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` (``-`` = stdout)."""
    text = json.dumps(payload, indent=2)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n", encoding="utf-8")
        print(f"JSON written to {path}", file=sys.stderr)
