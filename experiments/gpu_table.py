"""Print `gpu_check.sh`'s results (JSON lines from the benchmarks) as one markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def row(r: dict) -> str:
    kind = r["kind"]
    if kind == "attention":
        return (f"| attention {r['impl']} ({r['mask']}) vs xla, bf16 | out err {r['out_err']:.1e}, grad err "
                f"{r['grad_err']:.1e}: {r['verdict']} | fwd+bwd {r['ms']:.2f} ms vs xla {r['xla_ms']:.2f} ms | "
                f"{r['xla_ms'] / r['ms']:.2f}x |")
    if kind == "train":
        peak = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") else ""
        torch_peak = f", peak {r['torch_peak_gib']:.1f} GiB" if r.get("torch_peak_gib") else ""
        source = f" (the remat {r['torch_from']} row's)" if r.get("torch_from") else ""
        torch = (f"HF torch{source} {r['torch_tok_s']:,.0f} tok/s, MFU {r['torch_mfu_spec']:.1%}{torch_peak}"
                 if r.get("torch_tok_s") else "—")
        ratio = _fmt(r["tok_s"] / r["torch_tok_s"], ".2f") + "x" if r.get("torch_tok_s") else "—"
        return (f"| train {r['model']} {r['layers']} layers, {r['batch']}x{r['seq']}, {r['dtype']}, attention "
                f"{r['attention']}, remat {r['remat']} | {r['tok_s']:,.0f} tok/s, MFU {r['mfu_spec']:.1%} of spec, "
                f"{r['mfu_measured']:.1%} of measured matmul{peak} | {torch} | {ratio} |")
    if kind == "decode":
        peers = [f"{name} {r[name]:,.1f} tok/s" for name in ("hf_static", "llama2c") if r.get(name)]
        ratios = [f"{r['decode_tok_s'] / r[name]:.2f}x" for name in ("hf_static", "llama2c") if r.get(name)]
        flags = f" [XLA_FLAGS={r['xla_flags']}]" if r.get("xla_flags") else ""
        sampled = f", temperature {r['temperature']}, top_p {r['top_p']}" if r.get("temperature") else ""
        return (f"| decode {r['model']} {r['layers']} layers, {r['dtype']}, batch {r['batch']}, prompt {r['prompt']}"
                f"{sampled}{flags} | {r['decode_tok_s']:,.1f} tok/s, {r['ms_per_step']:.2f} ms/step (floor "
                f"{r['floor_ms']:.2f} ms, {r['floor_ms'] / r['ms_per_step']:.0%}) | {', '.join(peers) or '—'} | "
                f"{', '.join(ratios) or '—'} |")
    if kind == "init":
        how = "compile only" if r["aot"] else "compile + run"
        return (f"| random init {r['model']} {r['layers']} layers, {'scanned' if r['scan'] else 'unrolled'} | "
                f"{r['seconds']:.1f} s ({how}) | — | — |")
    return f"| {r['name']} | {kind.upper()}{' (exit ' + str(r['rc']) + ')' if 'rc' in r else ''} | — | — |"


def _shape(r: dict) -> tuple:
    return tuple(r.get(key) for key in ("model", "layers", "batch", "seq", "dtype", "param_dtype"))


def with_peers(rows: list[dict]) -> list[dict]:
    """Train rows timed without HF (another remat policy or attention) take the HF row of the same shape in the run."""
    hf = {_shape(r): r for r in rows if r["kind"] == "train" and r.get("torch_tok_s")}
    peers = ("torch_tok_s", "torch_mfu_spec", "torch_peak_gib")
    return [dict(r, **{k: hf[_shape(r)].get(k) for k in peers}, torch_from=hf[_shape(r)]["remat"])
            if r["kind"] == "train" and not r.get("torch_tok_s") and _shape(r) in hf else r for r in rows]


def main() -> None:
    rows = with_peers([json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()])
    device = next((r["device"] for r in rows if "device" in r), "unknown device")
    print(f"device: {device}")
    print("| work | llama_jax | peer (same device, same run) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(row(r))


if __name__ == "__main__":
    main()
