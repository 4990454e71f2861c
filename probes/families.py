"""GPU family and what its tensor cores can do, from the compute capability (and the name as a fallback).

The search space prunes knobs with these flags before any trial runs: an fp8 recipe on an A100 or FA3 on
an L40S would only waste a trial (or worse, crash a process). The flags say what the *hardware* allows;
whether the software stack really runs a kernel is the kernel check's job (``probes/kernels.py``), and
the search space requires both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuFamily:
    """Architecture generation and hardware capabilities of the GPUs a recipe will run on."""

    name: str = "none"
    """Ampere, Ada, Hopper, Blackwell, Turing, Volta, unknown, or none (no GPU)."""
    sm: str = ""
    """Compute capability as nvcc names it, e.g. 'sm90'; empty without a GPU."""
    bf16: bool = False
    """bf16 tensor cores (sm80+); Wan2.2 runs in bf16, so older GPUs need fp16 or fp32."""
    tf32: bool = False
    """TF32 tensor-core math for fp32 matmuls (sm80+): the `tf32` recipe knob means nothing elsewhere."""
    fp8: bool = False
    """fp8 (e4m3/e5m2) tensor cores: Ada sm89, Hopper sm90, Blackwell."""
    fp4: bool = False
    """fp4 (nvfp4/mxfp4) tensor cores: Blackwell only."""
    fa2: bool = False
    """FlashAttention-2 kernels build for this architecture (sm80+)."""
    fa3: bool = False
    """FlashAttention-3 (`flash_attn_interface`, wgmma/TMA): Hopper sm90 only."""
    fa4: bool = False
    """FlashAttention-4 (CuTe DSL, through torch's flash SDPA): Hopper sm90 and datacenter Blackwell sm10x
    (torch's FA4 glue refuses other majors; measured on an H100 in BENCHMARKS.md)."""


NO_GPU = GpuFamily()

#: Model names -> compute capability, for when NVML/nvidia-smi gave a name but no capability
#: (old drivers have no `compute_cap` query field). Longest match wins, so 'RTX 4090' beats 'RTX 40'.
_NAME_TO_CC: tuple[tuple[str, tuple[int, int]], ...] = (
    ("GB200", (10, 0)), ("GB300", (10, 3)), ("B200", (10, 0)), ("B300", (10, 3)), ("B100", (10, 0)),
    ("RTX PRO 6000", (12, 0)), ("RTX 50", (12, 0)), ("GB10", (12, 1)),
    ("H200", (9, 0)), ("H100", (9, 0)), ("H800", (9, 0)), ("H20", (9, 0)), ("GH200", (9, 0)),
    ("L40S", (8, 9)), ("L40", (8, 9)), ("L4", (8, 9)), ("L20", (8, 9)), ("RTX 40", (8, 9)),
    ("RTX 6000 Ada", (8, 9)), ("RTX 5000 Ada", (8, 9)), ("RTX 4000 Ada", (8, 9)),
    ("A100", (8, 0)), ("A800", (8, 0)), ("A30", (8, 0)),
    ("A10G", (8, 6)), ("A10", (8, 6)), ("A40", (8, 6)), ("A16", (8, 6)), ("A2", (8, 6)),
    ("RTX A6000", (8, 6)), ("RTX A5000", (8, 6)), ("RTX A4000", (8, 6)), ("RTX 30", (8, 6)),
    ("T4", (7, 5)), ("RTX 20", (7, 5)), ("V100", (7, 0)),
)


def cc_from_name(name: str) -> tuple[int, int] | None:
    """Best guess of the compute capability from a marketing name; None when the name is unknown."""
    best: tuple[int, tuple[int, int]] | None = None
    for key, cc in _NAME_TO_CC:
        # Word-ish match: 'A10' must not match inside 'A100', 'L4' not inside 'L40S', 'H20' not inside 'H200'.
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![0-9A-Za-z])", name) or (
            key.endswith(("RTX 50", "RTX 40", "RTX 30", "RTX 20")) and re.search(rf"{re.escape(key)}\d\d", name)
        ):
            if best is None or len(key) > best[0]:
                best = (len(key), cc)
    return best[1] if best else None


def parse_cc(text: str) -> tuple[int, int] | None:
    """'9.0' -> (9, 0); '12.0' -> (12, 0); anything else -> None."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def family_for(cc: tuple[int, int] | None, name: str = "") -> GpuFamily:
    """The family of one GPU. ``cc`` wins over ``name``; the name only fills a missing capability."""
    if cc is None:
        cc = cc_from_name(name)
    if cc is None:
        return GpuFamily(name="unknown") if name else NO_GPU
    major, minor = cc
    sm = f"sm{major}{minor}"
    if major >= 10:
        # sm100/sm103 datacenter Blackwell, sm110 Thor, sm120/sm121 consumer and workstation Blackwell.
        return GpuFamily("Blackwell", sm, bf16=True, tf32=True, fp8=True, fp4=True, fa2=True, fa4=major == 10)
    if major == 9:
        return GpuFamily("Hopper", sm, bf16=True, tf32=True, fp8=True, fa2=True, fa3=True, fa4=True)
    if (major, minor) >= (8, 9):
        return GpuFamily("Ada", sm, bf16=True, tf32=True, fp8=True, fa2=True)
    if major == 8:
        return GpuFamily("Ampere", sm, bf16=True, tf32=True, fa2=True)
    if (major, minor) >= (7, 5):
        return GpuFamily("Turing", sm)
    if major == 7:
        return GpuFamily("Volta", sm)
    return GpuFamily("unknown", sm)


def sm_number(family: GpuFamily) -> int:
    """'sm90' -> 90, 'sm100' -> 100, '' -> 0: for 'needs sm89+' comparisons and messages."""
    return int(family.sm[2:]) if family.sm.startswith("sm") and family.sm[2:].isdigit() else 0
