"""The ``edge-rt`` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edge_runtime import __version__
from edge_runtime.cli.cache import cache_group
from edge_runtime.cli.common import parallel_option, progress_bar, request_limit_options
from edge_runtime.cli.common import reports_errors as _reports_errors
from edge_runtime.cli.plan import plan
from edge_runtime.cli.status import status
from edge_runtime.gguf import keys
from edge_runtime.gguf.info import GGUFInfo, read_info
from edge_runtime.gguf.outtypes import ADAPTER_OUTTYPES, DEFAULT_ADAPTER_OUTTYPE, MERGE_OUTTYPES
from edge_runtime.names import printable
from edge_runtime.profiles import DeviceProfile, list_profiles, load_profile
from edge_runtime.runtime.models import resolve_model

if TYPE_CHECKING:
    from edge_runtime.distribution.transfer import TransferProgress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-rt")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """edge-rt: one resident INT4 base model, task LoRA adapters hot-applied per request."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.argument("peft_dir")
@click.option("--base", "base", default=None, help="Base model GGUF the adapter was trained on [default: embedded].")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="GGUF LoRA file to write.",
)
@click.option(
    "--outtype",
    type=click.Choice(ADAPTER_OUTTYPES),
    default=DEFAULT_ADAPTER_OUTTYPE,
    show_default=True,
    help="Tensor type of the written adapter.",
)
@click.option("--name", default=None, help="Adapter name recorded in the file [default: OUTPUT's stem].")
@click.option("--description", default="", help="What the adapter does (general.description; shown in manifests).")
@_reports_errors
def convert(peft_dir: str, base: str | None, output: Path, outtype: str, name: str | None, description: str) -> None:
    """Convert a PEFT LoRA (a folder or hf://ORG/REPO[@REV]) into a GGUF LoRA for BASE."""
    from converters import convert_peft_to_gguf

    base_path = resolve_model(base)
    with progress_bar(f"writing {output.name}") as progress:  # drawn from the first write: not for a refused input
        result = convert_peft_to_gguf(
            peft_dir,
            base=base_path,
            output=output,
            outtype=outtype,
            name=name,
            progress=progress,
            description=description,
        )
    click.echo(
        f"wrote {result.output} ({result.size_bytes / 1e6:.1f} MB): adapter {result.name!r}, "
        f"{result.tensor_count} tensors, rank {'/'.join(map(str, result.ranks))}, alpha {result.alpha:g}, "
        f"{result.architecture}, base {result.base_fingerprint[:12]}"
        + (f", aLoRA invoked by tokens {list(result.invocation_tokens)}" if result.invocation_tokens else "")
    )


MERGE_ERROR_WARNING = 0.2  # a merged tensor changed by more than this share of the adapter's change: warn


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", "base", default=None, help="Base model GGUF the adapter was converted for [default: embedded].")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model GGUF to write.",
)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Adapter scale folded into the weights.")
@click.option(
    "--outtype",
    type=click.Choice(MERGE_OUTTYPES),
    default="auto",
    show_default=True,
    help="Type of the merged tensors: auto (the most compact that keeps the adapter's change within 1%), "
    "base (each base tensor's own type) or a tensor type.",
)
@_reports_errors
def merge(adapter: Path, base: str | None, output: Path, scale: float, outtype: str) -> None:
    """Fold a GGUF LoRA ADAPTER into its base model and write one model GGUF (no per-token adapter cost)."""
    import signal

    from converters.merge import merge_adapter

    # SIGTERM (systemd, timeout) and SIGHUP (a dropped terminal) unwind like Ctrl-C: the partial output is removed.
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda received, _: sys.exit(128 + received))
    with progress_bar(f"merging into {output.name}") as progress:
        result = merge_adapter(
            adapter, base=resolve_model(base), output=output, scale=scale, outtype=outtype, progress=progress
        )
    types = ", ".join(f"{count} {name}" for name, count in result.merged_types.items())
    click.echo(
        f"wrote {result.output} ({result.size_bytes / 1e6:.1f} MB): adapter {result.adapter_name!r} "
        f"(sha256 {result.adapter_sha256[:12]}) at scale {result.scale:g} into base "
        f"{result.base_fingerprint[:12]}; {result.merged_tensors} tensors merged ({types}, largest change "
        f"error {result.max_delta_error:.2%}), {result.copied_tensors} copied"
    )
    if result.max_delta_error > MERGE_ERROR_WARNING:
        click.echo(
            f"warning: rounding to --outtype {outtype} changed a merged tensor by {result.max_delta_error:.0%} "
            "of what the adapter changes: the merged model will not answer as base + adapter does. Use "
            "--outtype auto (the default) or f16",
            err=True,
        )


@main.command()
@click.argument("file", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_reports_errors
def inspect(file: Path | None, as_json: bool) -> None:
    """Show what a GGUF file is: a LoRA adapter (ranks, alpha, base) or a base model (arch, quantisation, size).

    Without FILE, inspects the embedded default model.
    """
    info = read_info(file if file is not None else resolve_model(None))
    summary = _summary(info)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key.ljust(width)}  {'-' if value is None else printable(str(value))}")  # a file's own text


def _summary(info: GGUFInfo) -> dict[str, Any]:
    common: dict[str, Any] = {
        "path": str(info.path),
        "kind": info.kind,
        "name": info.name,
        "architecture": info.architecture,
        "size_bytes": info.size_bytes,
        "tensor_count": info.tensor_count,
    }
    if info.is_adapter:
        return common | {
            "lora_ranks": list(info.lora_ranks),
            "lora_alpha": info.lora_alpha,
            "tensor_types": list(info.tensor_types),
            "base_fingerprint": info.base_fingerprint,
            "base_name": info.metadata.get(keys.BASE_NAME),
            "description": info.metadata.get(keys.DESCRIPTION, ""),
            "peft_config_sha256": info.metadata.get(keys.PEFT_CONFIG_SHA256),
            "alora_invocation_tokens": list(info.invocation_tokens) or None,
        }
    return (
        common
        | {
            "quantization": info.quantization,
            "parameter_count": info.parameter_count,
            "context_length": info.context_length,
            "fingerprint": info.fingerprint,
        }
        | ({"merged_from": info.merged_from} if info.merged_from else {})
    )


@main.group(invoke_without_command=True)
@click.pass_context
@_reports_errors
def profiles(ctx: click.Context) -> None:
    """List the device profiles: the shipped ones and `auto` (this machine, the default)."""
    if ctx.invoked_subcommand is not None:
        return
    header = ("name", "aliases", "ram", "budget", "cache", "ctx", "parallel", "gpu layers", "download")
    rows = [header, *(_profile_row(profile) for profile in list_profiles())]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@profiles.command("show")
@click.argument("name_or_path")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_reports_errors
def show_profile(name_or_path: str, as_json: bool) -> None:
    """Print one profile (a name, an alias, or a path to a .toml file) as TOML you can copy and edit, or JSON."""
    profile = load_profile(name_or_path)
    click.echo(json.dumps(profile.to_dict(), indent=2) if as_json else profile.to_toml().rstrip("\n"))


def _profile_row(profile: DeviceProfile) -> tuple[str, ...]:
    cap = profile.network.max_download_kbps
    download = (f"{cap} kbps" if cap else "unlimited") + (", metered" if profile.network.metered else "")
    return (
        profile.name,
        ", ".join(profile.aliases) or "-",
        f"{profile.memory.ram_mb} MiB",
        f"{profile.memory.runtime_budget_mb} MiB",
        f"{profile.storage.adapter_cache_mb} MiB",
        str(profile.compute.ctx),
        str(profile.compute.parallel or "auto"),
        str(profile.compute.gpu_layers),
        download,
    )


@main.command()
@click.option(
    "--profile", "profile_name", default="auto", show_default=True, help="Device profile: name, alias or TOML file."
)
@click.option("--model", default=None, help="Base model: a GGUF path or hf://ORG/REPO/FILE.gguf [default: embedded].")
@click.option(
    "--adapters-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder of NAME.gguf adapters (made by `edge-rt convert`).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8080, show_default=True)
@click.option("--api-key", envvar="EDGE_RT_API_KEY", default=None, help="Require `Authorization: Bearer KEY`.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback bind without an API key.")
@click.option(
    "--preload",
    default="",
    help="Comma-separated adapters to load at start (with --cdn, pulled first when not cached).",
)
@click.option(
    "--ctx", type=click.IntRange(min=256), default=None, help="Context length in tokens [default: the profile's]."
)
@parallel_option
@request_limit_options
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds a completion may take from arrival (adapter download, queue and generation); past it the "
    "client gets 504 and the engine stops the generation inside its current token.",
)
@click.option("--cdn", default=None, help="Pull adapters on demand from this CDN (http(s)://, file://, hf://, oci://).")
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --cdn: require manifests signed by this key.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --cdn: the adapter cache [default: $EDGE_RT_HOME/adapters].",
)
@click.option("--offline", is_flag=True, help="With --cdn: no network attempt; serve what is cached.")
@click.option(
    "--allow-metered-updates",
    is_flag=True,
    help="With --cdn on a profile whose link is metered: fetch new versions in the background anyway.",
)
@_reports_errors
def serve(**flags: Any) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API."""
    from edge_runtime.runtime.budget import RequestLimits
    from edge_runtime.serve.daemon import ServeOptions, run

    limits = RequestLimits(
        max_body_bytes=flags.pop("max_body_kb") * 1024,
        max_queue=flags.pop("max_queue"),
        max_connections=flags.pop("max_connections"),
    )
    preload = tuple(filter(None, (name.strip() for name in flags.pop("preload").split(","))))
    insecure = flags.pop("insecure")
    options = ServeOptions(profile=flags.pop("profile_name"), limits=limits, preload=preload, **flags)
    if not options.loopback and not options.api_key and not insecure:
        raise click.UsageError(f"refusing to bind {options.host} without --api-key (or pass --insecure)")
    for flag in ("public_key", "cache_dir", "offline", "allow_metered_updates"):
        if flags[flag] and options.cdn is None:
            raise click.UsageError(f"--{flag.replace('_', '-')} only applies with --cdn URL")
    run(options, say=lambda line: click.echo(line, err=True))


@main.command()
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key file to write; the public key goes to OUT.pub.",
)
@_reports_errors
def keygen(out: Path) -> None:
    """Write an ed25519 key pair that signs CDN manifests: OUT (private, mode 0600) and OUT.pub (for devices)."""
    from edge_runtime.distribution.keys import generate_key

    if out.exists():
        raise click.UsageError(f"{out} exists; refusing to overwrite a signing key")
    private, public = generate_key(out)
    click.echo(f"wrote {private} (keep it secret; `edge-rt publish --key`) and {public} (devices: --public-key)")


@main.command()
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    help="CDN folder to write (blobs/<sha256>.gguf and manifest.json), or a registry: "
    "oci://HOST[:PORT]/REPOSITORY[:TAG].",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Private key from `edge-rt keygen` that signs the manifest.",
)
@click.option(
    "--expires-days",
    type=click.FloatRange(min=1 / 24, max=3650),
    default=30.0,
    show_default=True,
    help="Days until devices refuse this manifest.",
)
@click.option("--allow-empty", is_flag=True, help="Publish even when SRC_DIR holds no adapter (withdraws them all).")
@click.option(
    "--unsigned",
    is_flag=True,
    help="Publish without --key over a signed manifest (pinned devices will refuse it until they drop the key).",
)
@click.option(
    "--allow-renamed",
    is_flag=True,
    help="Publish files whose adapter name inside differs from their file name, under the file name.",
)
@_reports_errors
def publish(
    src_dir: Path,
    out: str,
    key: Path | None,
    expires_days: float,
    allow_empty: bool,
    unsigned: bool,
    allow_renamed: bool,
) -> None:
    """Publish every NAME.gguf adapter in SRC_DIR as content-addressed blobs and a new signed manifest."""
    from edge_runtime.distribution.keys import load_private_key
    from edge_runtime.distribution.manifest import format_time
    from edge_runtime.distribution.oci_publish import RegistryPublishResult, publish_to

    result = publish_to(
        src_dir,
        out,
        key=load_private_key(key) if key else None,
        expires_days=expires_days,
        allow_empty=allow_empty,
        unsigned=unsigned,
        allow_renamed=allow_renamed,
    )
    if result.key_changed:
        signer = f"key {result.keyid[:16]}" if result.keyid else "no key (UNSIGNED)"
        click.secho(
            f"warning: the previous manifest was signed by {', '.join(k[:16] for k in result.previous_keyids)}"
            f" and this one by {signer}: devices pinned to the old key refuse it until they get the new "
            "public key",
            fg="yellow",
            err=True,
        )
    for entry in result.manifest.adapters:
        click.echo(
            f"{entry.name}  {entry.size / 1e6:.2f} MB  rank {entry.rank}  sha256 {entry.sha256[:16]}  "
            f"base {entry.base_fingerprint[:12]}"
        )
    where = (
        f"pushed {result.reference} ({result.uploaded_bytes / 1e6:.2f} MB uploaded)"
        if isinstance(result, RegistryPublishResult)
        else f"wrote {result.manifest_path}"
    )
    click.echo(
        f"{where}: version {result.manifest.version}, "
        f"{_count(len(result.manifest.adapters), 'adapter')}, {_count(len(result.new_blobs), 'new blob')}, "
        f"expires {format_time(result.manifest.expires)}, {'signed' if result.signed else 'UNSIGNED'}"
    )


@main.command()
@click.option(
    "--cdn",
    required=True,
    help="http(s)://HOST/PATH, file:///PATH, hf://ORG/REPO[@REVISION] or oci://HOST[:PORT]/REPOSITORY[:TAG].",
)
@click.option("--adapters", "adapter_names", default=None, help="Comma-separated adapters to sync.")
@click.option("--all", "sync_all", is_flag=True, help="Sync every adapter offered for the base model.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Adapter cache [default: $EDGE_RT_HOME/adapters].",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Require manifests signed by this key (the .pub from `edge-rt keygen`).",
)
@click.option(
    "--profile",
    "profile_name",
    default="auto",
    show_default=True,
    help="Device profile: its cache budget and download cap apply.",
)
@click.option("--max-kbps", type=click.IntRange(min=0), default=None, help="Download cap in kbit/s (0 = none).")
@click.option("--cache-mb", type=click.IntRange(min=1), default=None, help="Cache disk budget in MiB.")
@click.option("--model", default=None, help="Base model whose adapters are offered [default: embedded].")
@click.option("--offline", is_flag=True, help="Make no network attempt; check what is cached.")
@click.option(
    "--reset-trust",
    is_flag=True,
    help="Forget this unsigned CDN's version and clock floors first (after a forged manifest raised them).",
)
@_reports_errors
def sync(
    cdn: str,
    adapter_names: str | None,
    sync_all: bool,
    cache_dir: Path | None,
    public_key: Path | None,
    profile_name: str,
    max_kbps: int | None,
    cache_mb: int | None,
    model: str | None,
    offline: bool,
    reset_trust: bool,
) -> None:
    """Fetch adapters from a CDN into the verified cache: resumable, sha256-checked, never past the manifest."""
    import asyncio

    from edge_runtime.distribution.client import SyncSettings, run_sync
    from edge_runtime.distribution.keys import load_public_key

    if (adapter_names is None) != sync_all:
        raise click.UsageError("pass exactly one of --adapters a,b and --all")
    names = None if sync_all else [n.strip() for n in (adapter_names or "").split(",") if n.strip()]
    try:
        report = asyncio.run(
            run_sync(
                cdn,
                names,
                progress=_ProgressLine(),
                reset_trust=reset_trust,
                cache_dir=cache_dir,
                offline=True if offline else None,
                public_key=load_public_key(public_key) if public_key else None,
                base_fingerprint=read_info(resolve_model(model)).fingerprint,
                sync_settings=SyncSettings.for_profile(
                    load_profile(profile_name), max_kbps=max_kbps, cache_mb=cache_mb
                ),
            )
        )
    except KeyboardInterrupt:
        click.echo(
            "\ninterrupted: what was downloaded stays in the cache's partial files, and the next "
            "`edge-rt sync` resumes from there",
            err=True,
        )
        raise SystemExit(130) from None
    for result in report.results:
        click.echo(
            f"{result.adapter.name}  {'downloaded' if result.downloaded else 'cached'}  "
            f"{result.adapter.size / 1e6:.2f} MB  sha256 {result.adapter.sha256[:16]}  {result.adapter.path}"
        )
    for name in report.incompatible:
        click.echo(f"{name}  skipped: converted for another base model", err=True)
    version = "offline" if report.manifest_version is None else f"manifest version {report.manifest_version}"
    click.echo(f"{_count(len(report.results), 'adapter')} ready ({version})", err=True)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


class _ProgressLine:
    """Prints one updating stderr line per download: bytes, rate and ETA (at most five times a second)."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, progress: TransferProgress) -> None:

        done = progress.done_bytes >= progress.total_bytes
        if not done and time.monotonic() - self._last < 0.2:
            return
        self._last = time.monotonic()
        eta = "?" if progress.eta_s is None else f"{progress.eta_s:.0f} s"
        click.echo(
            f"\r{progress.name}  {progress.done_bytes / 1e6:.1f}/{progress.total_bytes / 1e6:.1f} MB  "
            f"{progress.rate_bytes_per_second / 1e6:.2f} MB/s  ETA {eta}   ",
            nl=done,
            err=True,
        )


main.add_command(cache_group)
main.add_command(plan)
main.add_command(status)
