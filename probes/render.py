"""Rich tables of a ProbeResult for ``wanctl probe`` (the CLI prints them; ``--json`` prints the result)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from probes.result import ProbeResult

_STATUS_STYLE = {"ok": "green", "absent": "dim", "fails": "red"}


def render_probe(result: ProbeResult) -> list[Table]:
    """Machine, GPUs, links, software, kernels and notes, one table each (empty sections are left out)."""
    tables = [_machine(result)]
    if result.gpus:
        tables.append(_gpus(result))
    if result.links:
        tables.append(_links(result))
    tables.append(_software(result))
    if result.kernels:
        tables.append(_kernels(result))
    if result.notes:
        notes = Table(title="Notes", show_header=False)
        notes.add_column("note")
        for n in result.notes:
            notes.add_row(escape(n), style="yellow" if n.startswith("probe failed") else None)
        tables.append(notes)
    return tables


def _machine(r: ProbeResult) -> Table:
    t = Table(title="Machine", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    fam = r.family
    caps = [name for name in ("bf16", "tf32", "fp8", "fp4", "fa2", "fa3", "fa4") if getattr(fam, name)]
    t.add_row("machine", escape(r.describe()))
    t.add_row("fingerprint", r.fingerprint())
    t.add_row("family", f"{fam.name} {fam.sm}".strip())
    t.add_row("capabilities", ", ".join(caps) or "-")
    t.add_row("GPUs found through", r.gpu_source)
    t.add_row("CPU", escape(f"{r.host.cpu_model} ({r.host.cpu_cores} cores)"))
    t.add_row("RAM", f"{r.host.ram_total_mib / 1024:.1f} GiB total, {r.host.ram_available_mib / 1024:.1f} GiB available")
    for d in r.host.disks:
        t.add_row("free disk", escape(f"{d.path}: {d.free_mib / 1024:.1f} GiB"))
    if r.kernel_device:
        t.add_row("kernel checks ran on", escape(r.kernel_device))
    return t


def _gpus(r: ProbeResult) -> Table:
    t = Table(title="GPUs")
    for col in ("#", "name", "memory (free/total MiB)", "cc", "driver", "CUDA", "power W", "max SM MHz", "MIG", "PCI"):
        t.add_column(col)
    for g in r.gpus:
        mig = f"slice {g.mig_profile or '?'} ({g.uuid})" if g.mig_slice else g.mig_mode or "-"
        t.add_row(f"{g.index}:{g.mig_index}" if g.mig_slice else str(g.index), escape(g.name),
                  f"{g.memory_free_mib}/{g.memory_total_mib}",
                  g.compute_capability or "?", escape(g.driver_version), escape(g.cuda_driver_version),
                  f"{g.power_limit_w:g}", str(g.max_sm_clock_mhz), escape(mig), escape(g.pci_bus_id))
    return t


def _links(r: ProbeResult) -> Table:
    t = Table(title="GPU links" + (" (all NVLink)" if r.all_nvlink else ""))
    for col in ("GPU", "GPU", "link", "kind"):
        t.add_column(col)
    for lk in r.links:
        t.add_row(str(lk.a), str(lk.b), lk.code, lk.kind)
    return t


def _software(r: ProbeResult) -> Table:
    t = Table(title="Software")
    t.add_column("package")
    t.add_column("version")
    for name, value in vars(r.software).items():
        if value:
            t.add_row(name, escape(value), style="dim" if value == "absent" else None)
    return t


def _kernels(r: ProbeResult) -> Table:
    t = Table(title="Kernel checks")
    for col in ("check", "result", "rel err", "s"):
        t.add_column(col)
    for c in r.kernels:
        t.add_row(c.name, f"[{_STATUS_STYLE.get(c.status, '')}]{escape(c.summary)}[/]",
                  f"{c.rel_err:.2g}" if c.ok and c.rel_err else "", f"{c.seconds:.2f}")
    return t

