"""Accelerator chips in one table: peak dense bf16 FLOP/s (for MFU) and HBM per chip (for `plan`).

A chip is found by a substring of JAX's `device.device_kind` ("TPU v4", "TPU v5 lite", "NVIDIA H100 80GB HBM3");
the table is searched in order, most specific names first.

Usable HBM is what XLA may allocate on a TPU chip: the nominal size less what libtpu reserves for itself. It is the
"of N hbm" figure in XLA:TPU out-of-memory errors ("Ran out of memory in memory space hbm. Used 33.57G of 30.75G
hbm"), which is what `plan` must compare with: a program at 31.9 GiB "fits" the nominal 32 GiB of a v4 chip and
still fails there.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    """One accelerator: how JAX names it, its peak dense bf16 FLOP/s, its nominal and usable HBM (GiB)."""

    name: str
    kinds: tuple[str, ...]
    peak_flops: float
    hbm_gib: float | None = None
    usable_hbm_gib: float | None = None


CHIPS = (
    # Peaks from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5p, v5e, v6e).
    # Usable HBM as XLA:TPU reports it in out-of-memory errors ("Used X of N hbm"):
    # v5e: 15.75 in current libtpu ("Used 17.14G of 15.75G hbm"); 2024 releases reserved 530 MiB and said 15.48.
    Chip("v5e", ("v5 lite", "v5e"), 197e12, 16, 15.75),
    # v6e: 31.25 ("Used 33.07G of 31.25G hbm"; 260 MiB reserved).
    Chip("v6e", ("v6 lite", "v6e"), 918e12, 32, 31.25),
    # v5p: 95.74 (OpenXLA's HBM OOM documentation, error code 1000: "exceeding available bytes: 95.74G"). JAX
    # calls a v5p chip "TPU v5", a prefix of v5e's "TPU v5 lite": it must come after v5e. Usable exceeds the
    # spec page's "95 GB" because that figure is rounded down.
    Chip("v5p", ("v5p", "tpu v5"), 459e12, 95, 95.74),
    # v4: 30.75 ("Used 63.80G of 30.75G hbm"; 1.25 GiB reserved, EasyDeL issue 166 on a v4-32).
    Chip("v4", ("v4",), 275e12, 32, 30.75),
    Chip("v3", ("v3",), 123e12, 16),
    # GPUs (dense bf16 tensor-core peaks from NVIDIA's data sheets).
    Chip("h200", ("h200",), 989e12, 141),
    # The PCIe and NVL cards run slower clocks than the SXM part JAX calls "NVIDIA H100 80GB HBM3": before it.
    Chip("h100-pcie", ("h100 pcie",), 756e12, 80),
    Chip("h100-nvl", ("h100 nvl",), 835e12, 94),
    Chip("h100", ("h100",), 989e12, 80),
    Chip("a100", ("a100",), 312e12, 80),
    Chip("l4", ("l4",), 121e12, 24),
)


def chip(name: str) -> Chip:
    """The chip called `name` (a table name such as 'v5p')."""
    for entry in CHIPS:
        if entry.name == name:
            return entry
    raise KeyError(f"no chip '{name}' in llama_jax.chips.CHIPS; known: {[c.name for c in CHIPS]}")


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose name appears in a JAX `device_kind`, or None for kinds the table lacks (CPU)."""
    kind = device_kind.lower()
    for entry in CHIPS:
        if any(k in kind for k in entry.kinds):
            return entry
    return None
