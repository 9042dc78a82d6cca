"""Reading Serve config files strictly: Serve silently ignores misspelled keys (an autoscaling setting
with a typo just never applies), so every key is checked against Ray's own schemas here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.serve.schemas import MAX_IMAGES, AppArgs
from rdm.errors import ConfigError

IMPORT_PATH = "cluster.serve.app:build_app"
DEPLOYMENTS = ("Ingress", "Generator", "Retriever", "Allowances")


@dataclass(frozen=True)
class AppSpec:
    name: str
    route_prefix: str
    args: AppArgs
    deployments: dict[str, dict]  # deployment name -> options for Deployment.options()


def _fields(model) -> set[str]:
    return set(getattr(model, "model_fields", None) or model.__fields__)


def check_deployment(block: dict, where: str) -> tuple[str, dict]:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    options = dict(block)
    name = options.pop("name", None)
    if name not in DEPLOYMENTS:
        raise ConfigError(f"{where}: deployment name {name!r} is not one of {', '.join(DEPLOYMENTS)}")
    unknown = set(options) - _fields(DeploymentSchema)
    if unknown:
        raise ConfigError(f"{where}.{name}: unknown deployment option(s) {', '.join(sorted(unknown))}")
    bad = set(options.get("autoscaling_config") or {}) - _fields(AutoscalingConfig)
    if bad:
        raise ConfigError(f"{where}.{name}.autoscaling_config: unknown key(s) {', '.join(sorted(bad))}")
    if "num_replicas" in options and "autoscaling_config" in options:
        raise ConfigError(f"{where}.{name}: set num_replicas or autoscaling_config, not both")
    try:  # types and ranges, and the nested blocks Serve checks only at deploy time (backpressure_config)
        DeploymentSchema(name=name, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}.{name}: {err}") from err
    if name == "Allowances" and (options.get("num_replicas", 1) != 1 or "autoscaling_config" in options):
        # each replica would count alone: R replicas would let a client through R times its allowance
        raise ConfigError(f"{where}.{name}: runs exactly one replica (it holds the app's allowances); "
                          "leave num_replicas and autoscaling_config out")
    queued = options.get("max_queued_requests", -1)
    if name == "Generator" and queued != -1 and queued < MAX_IMAGES:
        # a request's images reach the Generator together, so a smaller queue would refuse a request of
        # MAX_IMAGES images even on an idle replica
        raise ConfigError(f"{where}.{name}: max_queued_requests must be -1 (no limit) or at least {MAX_IMAGES}, "
                          f"the images one request queues at once; got {queued}")
    return name, options


def check_http_options(http: dict, where: str) -> None:
    """The config's http_options, checked against Serve's schema (unknown keys are refused)."""
    from ray.serve.schema import HTTPOptionsSchema

    unknown = set(http) - _fields(HTTPOptionsSchema)
    if unknown:
        raise ConfigError(f"{where}: unknown http_options key(s) {', '.join(sorted(unknown))}")
    try:
        HTTPOptionsSchema(**http)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: http_options: {err}") from err


def parse_serve_config(data: dict, *, where: str = "serve config") -> list[AppSpec]:
    check_http_options(data.get("http_options") or {}, where)
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{where} has no applications")
    specs = []
    for i, app in enumerate(apps):
        here = f"{where}: applications[{i}]"
        if app.get("import_path") != IMPORT_PATH:
            raise ConfigError(f"{here}.import_path must be {IMPORT_PATH!r}, got {app.get('import_path')!r}")
        try:
            args = AppArgs(**(app.get("args") or {}))
        except ValueError as err:
            raise ConfigError(f"{here}.args: {err}") from err
        deployments = dict(check_deployment(block, f"{here}.deployments") for block in app.get("deployments", []))
        specs.append(AppSpec(app.get("name", "rdm"), app.get("route_prefix", "/"), args, deployments))
    return specs


def read_serve_config(path: str | Path) -> tuple[dict, list[AppSpec]]:
    """(http_options, applications) of a Serve config file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read Serve config {path}: {err}") from err
    specs = parse_serve_config(data, where=str(path))
    return data.get("http_options") or {}, specs
