"""Declarative files: every manifest parses, names things that exist, and the copies agree."""

import importlib
from pathlib import Path

import pytest
import yaml

from cluster.serve.config import parse_serve_config, read_serve_config
from rdm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = sorted((ROOT / "infra" / "serve").glob("*.yaml"))


def test_serve_configs_parse_strictly_and_import():
    assert {p.name for p in SERVE_CONFIGS} >= {"local.yaml", "gpu.yaml"}
    for path in SERVE_CONFIGS:
        http, specs = read_serve_config(path)
        module, _, attr = "cluster.serve.app:build_app".partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        generator = specs[0].deployments["Generator"]
        assert set(generator["user_config"]) == {"max_batch_size", "batch_wait_timeout_s"}
        assert generator["autoscaling_config"]["min_replicas"] <= generator["autoscaling_config"]["max_replicas"]


def test_local_config_binds_loopback_without_gpus():
    http, specs = read_serve_config(ROOT / "infra" / "serve" / "local.yaml")
    assert http["host"] == "127.0.0.1"
    assert all("num_gpus" not in d.get("ray_actor_options", {}) for d in specs[0].deployments.values())


def test_gpu_config_requires_a_token_and_gpus():
    http, specs = read_serve_config(ROOT / "infra" / "serve" / "gpu.yaml")
    assert specs[0].args.require_token and specs[0].deployments["Generator"]["ray_actor_options"]["num_gpus"] == 1


def test_rayservice_embeds_the_gpu_applications_block():
    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    gpu = yaml.safe_load((ROOT / "infra" / "serve" / "gpu.yaml").read_text())
    assert embedded["applications"] == gpu["applications"]
    assert embedded["http_options"]["request_timeout_s"] == gpu["http_options"]["request_timeout_s"]
    parse_serve_config(embedded)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["autoscaling_config"].update(target_ongoing_request=4), "target_ongoing_request"),
    (lambda d: d.update(num_replica=2), "num_replica"),
    (lambda d: d.update(name="Sampler"), "Sampler"),
    (lambda d: d.update(max_queued_requests=4), "at least 8"),
    (lambda d: d.update(max_queued_requests="many"), "max_queued_requests"),
    (lambda d: d.update(backpressure_config={"retry_after": 2}), "retry_after"),
    (lambda d: d.update(backpressure_config={"status_code": 500}), "status_code"),
])
def test_misspelled_serve_keys_are_rejected(mutate, match):
    data = yaml.safe_load((ROOT / "infra" / "serve" / "local.yaml").read_text())
    generator = next(d for d in data["applications"][0]["deployments"] if d["name"] == "Generator")
    mutate(generator)
    with pytest.raises(ConfigError, match=match):
        parse_serve_config(data)


@pytest.mark.parametrize("http, match", [({"request_timeout": 60}, "request_timeout"),
                                         ({"request_timeout_s": "soon"}, "request_timeout_s")])
def test_bad_http_options_are_rejected(http, match):
    data = yaml.safe_load((ROOT / "infra" / "serve" / "local.yaml").read_text())
    data["http_options"].update(http)
    with pytest.raises(ConfigError, match=match):
        parse_serve_config(data)


def test_shipped_configs_bound_the_generator_queue_and_time_out_requests():
    """Overload gets a fast 503 with Retry-After rather than an unbounded wait, and a request the proxy
    gives up on is cancelled (tests/integration/test_serve.py checks both on a live app)."""
    for path in SERVE_CONFIGS:
        http, specs = read_serve_config(path)
        generator = specs[0].deployments["Generator"]
        assert generator["max_queued_requests"] >= generator["max_ongoing_requests"], path
        assert generator["backpressure_config"]["retry_after_s"] > 0 and http["request_timeout_s"] > 0, path


def test_unknown_app_args_are_rejected():
    data = yaml.safe_load((ROOT / "infra" / "serve" / "local.yaml").read_text())
    data["applications"][0]["args"]["modle"] = "tiny"
    with pytest.raises(ConfigError, match="modle"):
        parse_serve_config(data)


def test_grafana_dashboard_uses_our_metrics():
    import json
    import re

    from cluster.serve import deployments

    dashboard = json.loads((ROOT / "infra" / "grafana" / "rdm-serving.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    source = Path(deployments.__file__).read_text()
    ours = set(re.findall(r'metrics\.\w+\("(rdm_\w+)"', source))
    assert ours == {"rdm_images_generated", "rdm_batch_size", "rdm_sampling_seconds", "rdm_generator_queue_depth",
                    "rdm_retrieval_seconds", "rdm_retrieval_batch_size", "rdm_requests", "rdm_out_of_memory_splits",
                    "rdm_sampling_stopped", "rdm_accelerator_failures"}
    for name in ours:
        assert f"ray_{name}" in exprs, name


def entrypoint_parses(entrypoint: str) -> None:
    """Each `rdm <subcommand> args...` of an entrypoint (commands joined by &&) names a subcommand whose own
    parser accepts the arguments."""
    import shlex

    from jobs.cli import SUBCOMMANDS

    commands: list[list[str]] = [[]]
    for word in shlex.split(entrypoint):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    for argv in commands:
        assert argv[0] == "rdm" and argv[1] in SUBCOMMANDS, entrypoint
        module = importlib.import_module(SUBCOMMANDS[argv[1]][0])
        args = module.build_parser().parse_args(argv[2:])
        if getattr(args, "retriever_options", None):  # JSON the parser takes as a string: validated as the job does
            from cluster.retriever import RetrieverOptions

            RetrieverOptions.from_json(args.retriever_options)


def test_every_infra_yaml_parses():
    files = sorted((ROOT / "infra").rglob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        assert yaml.safe_load(path.read_text()), path


def test_rayjobs_name_real_entrypoints():
    jobs = sorted((ROOT / "infra" / "kuberay").glob("rayjob-*.yaml"))
    assert {p.name for p in jobs} == {"rayjob-generate.yaml", "rayjob-index-rebuild.yaml"}
    for path in jobs:
        job = yaml.safe_load(path.read_text())
        assert job["kind"] == "RayJob"
        entrypoint_parses(job["spec"]["entrypoint"])
        images = {c["image"] for g in [job["spec"]["rayClusterSpec"]["headGroupSpec"],
                                        *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]}
        assert images == {"ghcr.io/rdm-cluster/rdm:latest"}
    rebuild = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob-index-rebuild.yaml").read_text())
    assert " && rdm index prune " in rebuild["spec"]["entrypoint"]  # old versions do not pile up


def test_every_shipped_config_reads_models_from_s3():
    """A RayJob's driver runs on the head and its query embedder on CPU workers: a node path (a volume only
    the GPU workers mount) fails there. Models and CLIP weights are s3:// URIs every pod can read."""
    rayjobs = [yaml.safe_load(p.read_text())["spec"]["entrypoint"]
               for p in sorted((ROOT / "infra" / "kuberay").glob("rayjob-*.yaml"))]
    apps = [yaml.safe_load((ROOT / "infra" / "serve" / "gpu.yaml").read_text())["applications"][0]["args"],
            yaml.safe_load(yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
                           ["spec"]["serveConfigV2"])["applications"][0]["args"]]
    files = [arg.split()[1] for entrypoint in rayjobs for arg in entrypoint.split(" --")[1:]
             if arg.startswith(("model ", "clip-weights "))]
    files += [args[key] for args in apps for key in ("model", "clip_weights")]
    assert len(files) == 7 and all(f.startswith("s3://") for f in files), files


def _pod_specs(node):
    if isinstance(node, dict):
        if "containers" in node:
            yield node
        for value in node.values():
            yield from _pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _pod_specs(value)


def test_a_pods_model_cache_is_capped_below_its_volume():
    """The kubelet evicts a pod whose emptyDir passes its sizeLimit: RDM_CACHE_MAX_GB keeps the cache under
    it (cluster.artifacts removes the copies used longest ago)."""
    capped = 0
    for path in sorted((ROOT / "infra" / "kuberay").glob("*.yaml")):
        for spec in _pod_specs(yaml.safe_load(path.read_text())):
            limits = {v["name"]: v["emptyDir"]["sizeLimit"] for v in spec.get("volumes", []) if "emptyDir" in v}
            for container in spec["containers"]:
                cache = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/var/cache/rdm"]
                if cache:
                    env = {e["name"]: e.get("value") for e in container.get("env", [])}
                    assert limits[cache[0]].endswith("Gi"), path
                    assert 0 < float(env["RDM_CACHE_MAX_GB"]) < 0.9 * float(limits[cache[0]][:-2]), path
                    capped += 1
    assert capped == 3


def test_every_rayservice_worker_group_mounts_the_token_files_an_ingress_replica_reads():
    """Serve places Ingress replicas (CPU only) on any worker with room, retriever nodes included; one that
    starts where `api_token_file` or `api_keys_file` is missing fails and is retried forever."""
    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    wanted = {str(Path(args["api_token_file"]).parent): "rdm-api-token",
              str(Path(args["api_keys_file"]).parent): "rdm-api-keys"}
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(groups) >= 2 and len(wanted) == 2
    for group in groups:
        spec = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0].get("volumeMounts", [])}
        for folder, secret in wanted.items():
            assert secrets.get(mounts.get(folder)) == secret, (group["groupName"], folder)


def test_a_rayjob_that_notifies_the_app_has_its_token_where_the_driver_runs():
    """The app requires a token (require_token); `--serve-url`'s refresh call sends RDM_API_TOKEN from the
    driver's environment, and a RayJob's driver runs on the head: without it the call is a 401."""
    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    secret = next(v["secret"]["secretName"] for v in service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
                  ["template"]["spec"]["volumes"] if "secret" in v)
    notifying = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "infra" / "kuberay").glob("rayjob-*.yaml"))]
    notifying = [job for job in notifying if "--serve-url" in job["spec"]["entrypoint"]]
    assert notifying
    for job in notifying:
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        token = next(e for e in head.get("env", []) if e["name"] == "RDM_API_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "api-token"}


def test_ray_up_config_is_consistent():
    config = yaml.safe_load((ROOT / "infra" / "ray-cluster.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"]["retriever"]["resources"] == {"retriever": 1}
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())


def test_dockerfile_copies_what_exists_and_installs_the_gpu_extra():
    import tomllib

    text = (ROOT / "infra" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "'.[gpu]'" in text and "gpu" in extras


def test_the_retriever_nodes_fit_every_retriever_actor_through_an_index_swap():
    """The RayService's retriever worker group (no autoscaler) must place every retriever actor of a database
    twice over: `replicas` copies of the shard groups (which every Serve Retriever replica shares), and a
    version swap loads the new actors before the old ones go. Actors that do not fit stay pending and the
    database never loads (or never swaps)."""
    import json
    import math
    import shlex

    from cluster.serve.schemas import AppArgs

    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    options = AppArgs(**app["args"]).retriever_options
    rebuild = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob-index-rebuild.yaml").read_text())
    argv = shlex.split(rebuild["spec"]["entrypoint"])
    shards = int(argv[argv.index("--shards") + 1])
    actors = options.replicas * math.ceil(shards / options.shards_per_actor)
    group = next(g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "retriever")
    per_node = json.loads(json.loads(group["rayStartParams"]["resources"]))
    assert options.resources, "retriever actors should ask for the retriever nodes' resource"
    per_node_actors = min(math.floor(per_node.get(name, 0) / amount) for name, amount in options.resources.items())
    assert 2 * actors <= group["minReplicas"] * per_node_actors, (
        f"{2 * actors} retriever actors, {group['minReplicas']} nodes of {per_node_actors}")
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert per_node_actors * options.num_cpus <= cpus  # and their CPUs fit a node


def test_grafana_jobs_dashboard_plots_every_job_series():
    import json
    import re

    from cluster import job_metrics

    dashboard = json.loads((ROOT / "infra" / "grafana" / "rdm-jobs.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    source = Path(job_metrics.__file__).read_text()
    counters = set(re.findall(r'_counter\("(rdm_\w+)"', source))
    histograms = set(re.findall(r'Histogram\("(rdm_\w+)"', source))
    assert len(counters) == 6 and len(histograms) == 2
    for name in counters:
        assert f"ray_{name}_total" in exprs, name
    for name in histograms:
        assert f"ray_{name}_bucket" in exprs, name


def test_alerting_rules_parse_and_watch_only_series_we_export():
    """infra/prometheus/rdm-alerts.yaml: every rule is valid PromQL (parsed by promql-parser), says how severe and
    what to do, and reads only series our deployments and jobs export (a renamed metric would leave an alert
    silent forever)."""
    import re

    import promql_parser
    import yaml

    from cluster import job_metrics
    from cluster.serve import deployments

    rules = [r for g in yaml.safe_load((ROOT / "infra" / "prometheus" / "rdm-alerts.yaml").read_text())["groups"]
             for r in g["rules"]]
    sources = Path(deployments.__file__).read_text() + Path(job_metrics.__file__).read_text()
    counters = set(re.findall(r'(?:metrics\.Counter|_counter)\("(rdm_\w+)"', sources))
    histograms = set(re.findall(r'Histogram\("(rdm_\w+)"', sources))
    exported = {f"ray_{n}_total" for n in counters} | {f"ray_{n}_{s}" for n in histograms
                                                       for s in ("bucket", "sum", "count")}
    assert len(rules) >= 8 and len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        promql_parser.parse(rule["expr"])  # raises on a syntax error
        assert rule["labels"]["severity"] in ("page", "warning") and rule["annotations"]["summary"], rule["alert"]
        used = set(re.findall(r"\bray_rdm_\w+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(ray_rdm_requests_total[5m])")  # the parser does refuse bad PromQL

