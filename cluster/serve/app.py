"""The typed app builder named by every Serve config: `cluster.serve.app:build_app`."""

from __future__ import annotations

from ray.serve import Application

from cluster.serve.deployments import Allowances, Generator, Ingress, Retriever
from cluster.serve.schemas import AppArgs


def build_app(args: dict, deployments: dict[str, dict] | None = None) -> Application:
    """Ingress -> (Generator, Retriever, and Allowances where images per minute are set), configured by
    `AppArgs`. Replicas, resources, autoscaling and batching come from the Serve config's `deployments`
    section: applied by Serve for `serve run/deploy`, or passed here as `deployments` (name -> options) by
    `rdm serve`."""
    config = AppArgs(**args)
    options = deployments or {}
    retriever = Retriever.options(**options.get("Retriever", {})).bind(
        config.index_uri, config.local_databases, config.retriever_options.model_dump(), config.refresh_interval_s)
    generator = Generator.options(**options.get("Generator", {})).bind(
        config.model, config.clip_weights, config.output_uri,
        config.inference(),
        config.url_expires_s, config.warm_up, config.compile_cache,
        config.max_image_pixels, config.image_sizes, config.stall_timeout_s)
    allowances = None
    if config.images_per_minute is not None or config.client_images_per_minute:
        allowances = Allowances.options(**options.get("Allowances", {})).bind(
            config.images_per_minute, config.client_images_per_minute, config.output_uri)
    return Ingress.options(**options.get("Ingress", {})).bind(generator, retriever, config.model_dump(), allowances)
