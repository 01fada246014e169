"""OpenTelemetry configuration, read from the standard `OTEL_*` environment variables.

One reading of the variables for every process of the stack: the prediction service
(`cd4ml.serving.tracing`) and Airflow (`airflow_trace_env`). Tracing is OFF unless an OTLP endpoint
is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) or the console
exporter is asked for: the specification's default endpoint (localhost:4318) is not used, so a
stack without a collector sends nothing anywhere.

These variables are not fields of `cd4ml.core.settings.Settings` on purpose: the OpenTelemetry SDK
(exporter headers, timeouts, compression, certificates, batch sizes, sampler) and Airflow read them
directly, so they have one meaning and one source. This module only decides *whether* to trace and
*which* exporter to build, and names the variable when a value cannot be used.

Pure functions of a mapping (pass `os.environ`); nothing here imports the OpenTelemetry SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cd4ml.core.settings import SettingsError

HTTP_PROTOBUF = "http/protobuf"  # the specification's default protocol
GRPC = "grpc"
PROTOCOLS = (HTTP_PROTOBUF, GRPC)
# OTEL_TRACES_EXPORTER values understood here. `otlp` follows the protocol variables; the other two
# are the SDK's entry-point names that fix the protocol (Airflow only understands those: see below).
EXPORTERS = ("otlp", "otlp_proto_http", "otlp_proto_grpc", "console", "none")
SAMPLERS = ("parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio", "always_on",
            "always_off", "traceidratio")  # fmt: skip
DEFAULT_SERVICE_NAME = "cd4ml-prediction-service"
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class TraceExport:
    """Where and how a process exports its spans (None from `trace_export` means: no tracing)."""

    otlp: bool  # export over OTLP to `endpoint`
    console: bool  # also print spans to stdout (OTEL_TRACES_EXPORTER=console; for debugging)
    protocol: str  # "http/protobuf" | "grpc"
    endpoint: str | None  # the traces endpoint the exporter posts to (None with console only)
    service_name: str | None  # OTEL_SERVICE_NAME, if set
    sampler: str = "parentbased_always_on"  # OTEL_TRACES_SAMPLER (the specification's default)
    sampler_ratio: float = 1.0  # OTEL_TRACES_SAMPLER_ARG, for the *traceidratio samplers


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """A variable's value; empty counts as unset, as the OpenTelemetry specification says."""
    value = environ.get(name, "").strip()
    return value or None


def sdk_disabled(environ: Mapping[str, str]) -> bool:
    return (_get(environ, "OTEL_SDK_DISABLED") or "").lower() == "true"


def _exporters(environ: Mapping[str, str]) -> list[str]:
    raw = _get(environ, "OTEL_TRACES_EXPORTER") or "otlp"
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER={raw!r}: {', '.join(unknown)} not supported; "
            f"use one or more of {', '.join(EXPORTERS)} (comma-separated)"
        )
    return [] if "none" in names else names


def _protocol(environ: Mapping[str, str], exporters: list[str]) -> str:
    if "otlp_proto_grpc" in exporters:
        return GRPC
    if "otlp_proto_http" in exporters:
        return HTTP_PROTOBUF
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = _get(environ, name)
        if value is None:
            continue
        if value.lower() not in PROTOCOLS:
            # http/json is in the specification, but the Python SDK has no exporter for it.
            raise SettingsError(
                f"{name}={value!r} is not supported; use {HTTP_PROTOBUF} (the default) or {GRPC}"
            )
        return value.lower()
    return HTTP_PROTOBUF


def _endpoint(environ: Mapping[str, str], protocol: str) -> str | None:
    """The traces endpoint, resolved as the SDK's exporters do: the signal-specific variable as
    it is, else the base endpoint plus `/v1/traces` for HTTP (gRPC takes the base as it is)."""
    name, value = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", _get(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if value is None:
        name, value = "OTEL_EXPORTER_OTLP_ENDPOINT", _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if value is None or protocol != HTTP_PROTOBUF:
        return value
    if not value.startswith(("http://", "https://")):
        raise SettingsError(
            f"{name}={value!r} is not a URL; with {HTTP_PROTOBUF} it must start with http:// or https:// "
            "(e.g. http://otel-collector:4318)"
        )
    return value if name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" else value.rstrip("/") + TRACES_PATH


def _sampler(environ: Mapping[str, str]) -> tuple[str, float]:
    name = (_get(environ, "OTEL_TRACES_SAMPLER") or SAMPLERS[0]).lower()
    if name not in SAMPLERS:
        raise SettingsError(
            f"OTEL_TRACES_SAMPLER={name!r} is not supported; use one of {', '.join(SAMPLERS)}"
        )
    raw = _get(environ, "OTEL_TRACES_SAMPLER_ARG")
    if raw is None or not name.endswith("traceidratio"):
        return name, 1.0
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise SettingsError(
            f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a ratio; use a number from 0 to 1 (e.g. 0.1)"
        )
    return name, ratio


def trace_export(environ: Mapping[str, str]) -> TraceExport | None:
    """How to export traces under `environ`, or None when tracing is off.

    Off when OTEL_SDK_DISABLED=true, when OTEL_TRACES_EXPORTER=none, or when no OTLP endpoint is set
    (and the console exporter is not asked for). Raises SettingsError naming the variable when a
    value cannot be used (unknown exporter or sampler, http/json, an HTTP endpoint that is not a
    URL, a sampler ratio outside 0..1).
    """
    if sdk_disabled(environ):
        return None
    exporters = _exporters(environ)
    if not exporters:
        return None
    protocol = _protocol(environ, exporters)
    endpoint = _endpoint(environ, protocol)
    otlp = endpoint is not None and any(n.startswith("otlp") for n in exporters)
    console = "console" in exporters
    if not otlp and not console:
        return None
    sampler, ratio = _sampler(environ)
    return TraceExport(
        otlp=otlp,
        console=console,
        protocol=protocol,
        endpoint=endpoint if otlp else None,
        service_name=_get(environ, "OTEL_SERVICE_NAME"),
        sampler=sampler,
        sampler_ratio=ratio,
    )


def airflow_trace_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every Airflow process needs to trace as `environ` asks (empty when off).

    What Airflow 3.3 does (read from airflow/_shared/observability/traces/__init__.py and
    config_templates/config.yml): `[traces] otel_on` is the only switch; otel_host, otel_port,
    otel_ssl_active and otel_service are deprecated since 3.2 in favour of the standard OTEL_*
    variables, which Airflow's processes read themselves. But Airflow picks its exporter by the
    entry-point name in OTEL_TRACES_EXPORTER (default `otlp`, which is OTLP/**gRPC** in the SDK's
    packages) and ignores OTEL_EXPORTER_OTLP_PROTOCOL. So this returns:

    - `AIRFLOW__TRACES__OTEL_ON=True`;
    - OTEL_TRACES_EXPORTER as the entry-point name of the protocol asked for (`otlp_proto_http`
      for http/protobuf, the specification's default; `otlp_proto_grpc` for grpc), or `console`;
      Airflow loads exactly one exporter, so OTLP wins over console when both are asked for;
    - OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, resolved as `trace_export` resolves it: the SDK's exporter
      would read an empty OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (docker-compose's `${VAR:-}`) as the
      endpoint, where the specification and cd4ml read it as unset;
    - every other OTEL_* variable set in `environ`, unchanged, so that the stack's processes see
      them even when they are started with an environment of their own (supervisord, containers).
    """
    export = trace_export(environ)
    if export is None:
        return {}
    env = {k: v for k, v in environ.items() if k.startswith("OTEL_") and v.strip()}
    env["AIRFLOW__TRACES__OTEL_ON"] = "True"
    if export.otlp:
        assert export.endpoint is not None  # otlp means an endpoint was found
        env["OTEL_TRACES_EXPORTER"] = "otlp_proto_grpc" if export.protocol == GRPC else "otlp_proto_http"
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = export.endpoint
    else:
        env["OTEL_TRACES_EXPORTER"] = "console"
    return env
