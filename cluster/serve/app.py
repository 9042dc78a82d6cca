"""The typed app builder named by every Serve config: `cluster.serve.app:build_app`."""

from __future__ import annotations

from ray.serve import Application

from cluster.serve.deployments import Generator, Ingress, Retriever
from cluster.serve.schemas import AppArgs


def build_app(args: dict) -> Application:
    """Ingress -> (Generator, Retriever), configured by `AppArgs`; replicas, resources, autoscaling and
    batching come from the Serve config's `deployments` section."""
    config = AppArgs(**args)
    retriever = Retriever.bind(config.index_uri, config.local_databases, config.retriever_options)
    generator = Generator.bind(config.model, config.clip_weights, config.output_uri, config.autocast,
                               config.url_expires_s)
    return Ingress.bind(generator, retriever, config.model_dump())
