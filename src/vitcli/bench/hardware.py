"""What the machine can do: a table of GPU peak FLOP/s (for MFU) and a measured matmul probe.

Peaks are NVIDIA's dense (no 2:4 sparsity) datasheet figures in TFLOP/s: bf16 on the tensor cores and
plain fp32 (PyTorch's default fp32 matmul precision does not use TF32). Names are matched against
`torch.cuda.get_device_name()` in order, most specific first.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

import torch

# (pattern on the device name, bf16 dense TFLOP/s, fp32 TFLOP/s); None where the card has no such units.
GPU_PEAKS: list[tuple[str, float | None, float | None]] = [
    (r"\bB200\b", 2250.0, 80.0),
    (r"\bGH200\b", 989.0, 67.0),
    (r"\bH200\b", 989.0, 67.0),
    (r"\bH100\b.*\bPCIe\b", 756.0, 51.0),
    (r"\bH100\b.*\bNVL\b", 835.0, 60.0),
    (r"\bH100\b", 989.0, 67.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b.*\bPCIe\b", 756.0, 51.0),
    (r"\bH800\b", 989.0, 67.0),
    (r"\bH20\b", 148.0, 44.0),
    (r"\bA100\b", 312.0, 19.5),
    (r"\bA800\b", 312.0, 19.5),
    (r"\bA30\b", 165.0, 10.3),
    (r"\bA10\b", 125.0, 31.2),
    (r"\bL40S\b", 362.0, 91.6),
    (r"\bL40\b", 181.0, 90.5),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bV100\b", None, 15.7),
    (r"\bT4\b", None, 8.1),
]


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet dense peak in FLOP/s for this GPU and compute dtype, or None when unknown."""
    for pattern, bf16, fp32 in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            tflops = bf16 if dtype == torch.bfloat16 else fp32 if dtype == torch.float32 else None
            return tflops * 1e12 if tflops is not None else None
    return None


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU model with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


@dataclass
class MatmulProbe:
    """One large square `torch.mm` in the compute dtype: the machine's own attainable matmul FLOP/s.

    On a CPU it runs in fp32 (what the models run in by default); on a GPU in the bench's dtype.
    """

    device: torch.device
    dtype: torch.dtype
    n: int

    def __post_init__(self) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(self.n, self.n, generator=g).to(self.device, self.dtype)
        self.b = torch.randn(self.n, self.n, generator=g).to(self.device, self.dtype)
        self.out = torch.empty(self.n, self.n, device=self.device, dtype=self.dtype)

    @property
    def flops(self) -> int:
        return 2 * self.n ** 3

    def step(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype) -> MatmulProbe:
        if device.type == "cuda":
            return cls(device, dtype, 8192)
        return cls(device, torch.float32, 2048)
