"""``edge-rt plan``: how a device profile's runtime budget splits between the base model, its KV cache, buffers
and adapters, and whether given adapters fit together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.common import parallel_option, reports_errors, request_limit_options
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.models import resolve_model

__all__ = ["plan"]


@click.command()
@click.option(
    "--profile", "profile_name", default="auto", show_default=True, help="Device profile: name, alias or TOML file."
)
@click.option("--model", default=None, help="Base model GGUF [default: embedded SmolLM2].")
@click.option(
    "--ctx", type=click.IntRange(min=256), default=None, help="Context length in tokens [default: the profile's]."
)
@click.option("--adapter-mb", type=float, default=None, help="Size of one adapter in MiB, to count how many fit.")
@click.option(
    "--adapters",
    "adapter_files",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Adapter GGUF files to fit together (repeatable).",
)
@parallel_option
@request_limit_options  # as given to `serve`
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@reports_errors
def plan(
    profile_name: str,
    model: str | None,
    ctx: int | None,
    adapter_mb: float | None,
    adapter_files: tuple[Path, ...],
    parallel: int | None,
    max_body_kb: int,
    max_queue: int,
    max_connections: int | None,
    as_json: bool,
) -> None:
    """Show how a device's runtime budget splits between the base model, its KV cache, buffers and adapters.

    Exits 7 when the base model, or the --adapters listed together, do not fit the budget."""
    from edge_runtime.errors import AdaptersDoNotFit
    from edge_runtime.gguf.header import read_header
    from edge_runtime.gguf.info import base_fingerprint
    from edge_runtime.runtime.budget import RequestLimits, adapter_resident_bytes
    from edge_runtime.runtime.compatibility import BaseCompatibility
    from edge_runtime.runtime.plan import plan_for

    profile, model_path = load_profile(profile_name), resolve_model(model)
    memory = plan_for(
        profile,
        model_path,
        ctx=ctx,
        parallel=parallel,
        requests=RequestLimits(max_body_bytes=max_body_kb * 1024, max_queue=max_queue, max_connections=max_connections),
    )
    base = read_header(model_path)
    compatibility = BaseCompatibility(base, base_fingerprint(base))
    for path in adapter_files:  # a model file or another base's adapter would make the sums meaningless
        compatibility.check(path.stem, read_header(path))
    adapter_bytes = [adapter_resident_bytes(p) for p in adapter_files]
    one = int(adapter_mb * (1 << 20)) if adapter_mb else max(adapter_bytes, default=0)
    report = memory.as_dict() | {
        "profile": profile.name,
        "adapter_bytes": one,
        "adapters_that_fit": memory.adapters_that_fit(one) if one else None,
        "listed_adapters_bytes": sum(adapter_bytes),
        "listed_adapters_fit": sum(adapter_bytes) <= memory.adapter_budget_bytes,
    }
    click.echo(json.dumps(report, indent=2) if as_json else _plan_table(report))
    memory.require_fit(profile.name)
    if not report["listed_adapters_fit"]:
        raise AdaptersDoNotFit(
            count=len(adapter_files),
            needed_bytes=sum(adapter_bytes),
            budget_bytes=memory.adapter_budget_bytes,
            profile=profile.name,
        )


def _plan_table(report: dict[str, Any]) -> str:
    from edge_runtime.runtime.budget import MEMORY_TERMS

    mib = 1 << 20
    rows = [(term.describe(report), report[term.key]) for term in MEMORY_TERMS]
    rows += [
        ("= fixed", report["fixed_bytes"]),
        ("runtime budget", report["budget_bytes"]),
        ("= adapter budget", report["adapter_budget_bytes"]),
    ]
    lines = [f"memory plan for profile {report['profile']}"] + [
        f"  {label:<48}{value / mib:>10.1f} MiB" for label, value in rows
    ]
    if report["adapters_that_fit"] is not None:
        lines.append(
            f"  adapters of {report['adapter_bytes'] / mib:.1f} MiB that fit at once: {report['adapters_that_fit']}"
        )
    if report["listed_adapters_bytes"]:
        verdict = "fit" if report["listed_adapters_fit"] else "do NOT fit"
        lines.append(f"  the listed adapters ({report['listed_adapters_bytes'] / mib:.1f} MiB) {verdict} together")
    return "\n".join(lines)
