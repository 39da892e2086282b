"""Describe the machine a benchmark ran on (torch-free).

x86/ARM CPU model and the ISA flags that decide INT8/BF16 speed, cores available and threads used,
memory, OS and library versions; on NVIDIA Jetson (detected by `/etc/nv_tegra_release`) also the
module, L4T/JetPack, TensorRT and CUDA versions, the nvpmodel power mode, and the board's input
power sampled with `tegrastats` while a row is timed. Every probe reads files under `root` (tests
point it at a fake tree) and is optional: a missing file or tool leaves its field empty.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

# ISA features that change which kernels the runtimes pick (x86 names, then ARM names).
_X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
_ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")
# ARM (implementer, part) -> core name, for /proc/cpuinfo files without "model name" (Jetson).
_ARM_PARTS = {("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd07"): "Cortex-A57",
              ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1", ("0x4e", "0x004"): "NVIDIA Carmel",
              ("0x41", "0xd4f"): "Neoverse-V2"}
# L4T major.minor -> JetPack, used when the nvidia-jetpack package cannot be queried.
_L4T_TO_JETPACK = {"36.4": "6.1/6.2", "36.3": "6.0", "36.2": "6.0 DP", "35.6": "5.1.4", "35.5": "5.1.3",
                   "35.4": "5.1.2", "35.3": "5.1.1", "35.2": "5.1", "35.1": "5.0.2", "32.7": "4.6.x"}
_VERSION_PACKAGES = ("mirage-edge", "numpy", "torch", "timm", "onnxruntime", "openvino", "nncf", "tensorrt")


@dataclasses.dataclass
class HardwareInfo:
    cpu_model: str = ""
    arch: str = ""
    cpu_flags: list[str] = dataclasses.field(default_factory=list)
    cpu_count: int = 0               # logical CPUs usable by this process (affinity / cgroup quota)
    cpu_count_host: int = 0          # logical CPUs the OS reports
    threads: int = 0                 # threads the benchmark asked the runtimes to use
    hypervisor: bool = False
    memory_gb: float = 0.0
    os: str = ""
    python: str = ""
    gpu: str = ""
    jetson: dict[str, str] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One line for each record: 'Intel Xeon (x86_64, 2 CPUs, 2 threads, KVM guest; avx512_vnni ...)'."""
        bits = [self.arch, f"{self.cpu_count} CPUs", f"{self.threads} threads used"]
        if self.hypervisor:
            bits.append("virtual machine")
        head = f"{self.cpu_model} ({', '.join(b for b in bits if b)})"
        if self.jetson:
            head = f"{self.jetson.get('module', 'Jetson')}, {head}"
        if self.gpu:
            head += f", GPU {self.gpu}"
        return head

    def versions_str(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.versions.items())

    def jetson_str(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.jetson.items())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        """A bullet list for the report's 'Machine' section."""
        lines = [f"- CPU: {self.cpu_model} ({self.arch}{', virtual machine' if self.hypervisor else ''})",
                 f"- CPUs usable: {self.cpu_count} (host reports {self.cpu_count_host}); threads used: {self.threads}",
                 f"- ISA flags relevant to INT8/BF16: {', '.join(self.cpu_flags) or 'none found'}",
                 f"- Memory: {self.memory_gb:.1f} GB; OS: {self.os}; Python {self.python}"]
        if self.gpu:
            lines.append(f"- GPU: {self.gpu}")
        if self.jetson:
            lines.append("- Jetson: " + ", ".join(f"{k} {v}" for k, v in self.jetson.items()))
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        return "\n".join(lines)


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel.lstrip("/")).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpuinfo(root: Path) -> tuple[str, list[str], bool]:
    text = _read(root, "/proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip().lower(), v.strip())
    model = fields.get("model name", "")
    if not model and "cpu part" in fields:
        model = _ARM_PARTS.get((fields.get("cpu implementer", ""), fields["cpu part"]), f"ARM part {fields['cpu part']}")
    if not model:
        model = platform.processor() or platform.machine()
    if "vendor_id" in fields and "cpu family" in fields:
        model += f" [{fields['vendor_id']} family {fields['cpu family']} model {fields.get('model', '?')}]"
    raw = set((fields.get("flags") or fields.get("features") or "").split())
    wanted = _X86_FLAGS if "flags" in fields else _ARM_FLAGS
    return model, [f for f in wanted if f in raw], "hypervisor" in raw


def _usable_cpus(root: Path) -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = (_read(root, "/sys/fs/cgroup/cpu.max") or "").split()
    if len(quota) == 2 and quota[0] != "max":
        n = min(n, max(1, round(int(quota[0]) / int(quota[1]))))
    return n


def _memory_gb(root: Path) -> float:
    m = re.search(r"MemTotal:\s+(\d+)", _read(root, "/proc/meminfo") or "")
    return int(m.group(1)) / 2**20 if m else 0.0


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def jetson_info(root: str | Path = "/") -> dict[str, str]:
    """Module, L4T, JetPack, TensorRT, CUDA and power mode on a Jetson; {} elsewhere."""
    root = Path(root)
    release = _read(root, "/etc/nv_tegra_release")
    if release is None:
        return {}
    info: dict[str, str] = {}
    model = _read(root, "/proc/device-tree/model")
    info["module"] = model.strip("\x00 \n") if model else "NVIDIA Jetson (unknown module)"
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    if m:
        info["l4t"] = f"{m.group(1)}.{m.group(2)}"
    live = root == Path("/")
    jetpack = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]) if live else None
    if not jetpack and "l4t" in info:
        jetpack = _L4T_TO_JETPACK.get(".".join(info["l4t"].split(".")[:2]))
        jetpack = f"{jetpack} (from L4T)" if jetpack else None
    if jetpack:
        info["jetpack"] = jetpack
    trt = None
    try:
        trt = importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        if live:
            trt = _run(["dpkg-query", "-W", "-f=${Version}", "tensorrt"])
    if trt:
        info["tensorrt"] = trt
    cuda = _read(root, "/usr/local/cuda/version.json")
    if cuda:
        try:
            info["cuda"] = json.loads(cuda)["cuda"]["version"]
        except (ValueError, KeyError, TypeError):
            pass
    elif (txt := _read(root, "/usr/local/cuda/version.txt")) and (m := re.search(r"([\d.]+)", txt)):
        info["cuda"] = m.group(1)
    mode = _run(["nvpmodel", "-q"]) if live else _read(root, "/var/lib/nvpmodel/status")
    if mode and (m := re.search(r"(?:NV Power Mode|pmode)\s*:\s*(\S+)", mode)):
        info["power_mode"] = m.group(1)
    if shutil.which("tegrastats"):
        info["tegrastats"] = "yes"
    return info


def describe_hardware(threads: int = 0, root: str | Path = "/") -> HardwareInfo:
    """Probe the machine. `root` is the filesystem root to read (tests pass a fake tree)."""
    root = Path(root)
    model, flags, hyper = _cpuinfo(root)
    gpu = ""
    if shutil.which("nvidia-smi") and root == Path("/"):
        gpu = (_run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]) or "").replace("\n", "; ")
    return HardwareInfo(cpu_model=model, arch=platform.machine(), cpu_flags=flags, cpu_count=_usable_cpus(root),
                        cpu_count_host=os.cpu_count() or 0, threads=threads, hypervisor=hyper,
                        memory_gb=_memory_gb(root), os=platform.platform(terse=True), python=platform.python_version(),
                        gpu=gpu, jetson=jetson_info(root), versions=library_versions())


_RAIL = re.compile(r"\b(VDD_IN|POM_5V_IN)\s+(\d+)(?:mW)?/(\d+)")


def parse_tegrastats_power(line: str) -> float | None:
    """Instantaneous board input power in watts from one tegrastats line (VDD_IN on Orin, POM_5V_IN on Xavier/Nano)."""
    m = _RAIL.search(line)
    return int(m.group(2)) / 1000.0 if m else None


class PowerSampler:
    """Samples board power with `tegrastats --interval MS` while the `with` block runs.

    `mean_w` is None when tegrastats is absent (not a Jetson) or printed no power rail.
    """

    def __init__(self, interval_ms: int = 100, exe: str = "tegrastats") -> None:
        self.interval_ms = interval_ms
        self.exe = shutil.which(exe)
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PowerSampler":
        if self.exe:
            try:
                self._proc = subprocess.Popen([self.exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self._proc = None
            if self._proc is not None:
                self._thread = threading.Thread(target=self._read, daemon=True)
                self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            watts = parse_tegrastats_power(line)
            if watts is not None:
                self.samples.append(watts)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            if self._thread is not None:
                self._thread.join(timeout=5)

    @property
    def mean_w(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


__all__ = ["HardwareInfo", "describe_hardware", "jetson_info", "library_versions", "PowerSampler",
           "parse_tegrastats_power"]
