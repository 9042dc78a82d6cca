import pytest
from pydantic import ValidationError

from cluster.serve.outputs import image_key
from cluster.serve.schemas import AppArgs, GenerateRequest


def test_defaults_and_limits():
    request = GenerateRequest(prompt="a boat")
    assert (request.num_neighbors, request.num_images, request.sampler, request.output) == (4, 1, "ddim", "url")
    for bad in ({"prompt": "a", "guidance_scale": float("nan")}, {"prompt": "a", "num_steps": 0},
                {"prompt": "   "}, {"prompt": "a", "seed": 2**63}, {}):
        with pytest.raises(ValidationError):
            GenerateRequest(**bad)


def test_output_keys_are_deterministic_and_spread():
    assert image_key("abc", 7) == image_key("abc", 7) != image_key("abc", 8)
    prefixes = {image_key(f"req{i}", 0).split("/")[1] for i in range(200)}
    assert len(prefixes) > 100 and image_key("abc", 7).endswith("/abc/7.png")


def test_s3_outputs_get_presigned_urls_and_metadata(fake_s3):
    from cluster.serve.outputs import image_url, write_image
    from cluster.storage import open_store

    store = open_store("s3://rdm-unit/serve")
    key = image_key("req1", 3)
    write_image(store, key, b"png-bytes", {"prompt": "a boat"})
    assert store.read_bytes(key) == b"png-bytes" and b"a boat" in store.read_bytes(key[:-4] + ".json")
    url = image_url(store, key, expires_s=600)
    assert url.startswith("https://") and "X-Amz-Expires=600" in url and "serve/images/" in url


def test_rdm_serve_refuses_public_binds_without_a_token(monkeypatch):
    from jobs.serve import check_auth
    from rdm.errors import ConfigError

    class Spec:
        name, args = "rdm", type("Args", (), {"api_token_file": None, "api_keys_file": None})()

    monkeypatch.delenv("RDM_API_TOKEN", raising=False)
    check_auth("127.0.0.1", [Spec], insecure=False)
    with pytest.raises(ConfigError, match="without an API token"):
        check_auth("0.0.0.0", [Spec], insecure=False)
    check_auth("0.0.0.0", [Spec], insecure=True)
    monkeypatch.setenv("RDM_API_TOKEN", "t")
    check_auth("0.0.0.0", [Spec], insecure=False)


def test_the_app_args_offer_exactly_the_inference_settings_of_the_library():
    """The Serve config validates the inference settings itself (a misspelling is refused at deploy time),
    so its choices must be the library's."""
    from typing import get_args

    from rdm.acceleration import ATTENTION_KERNELS, COMPILE_MODES, KERNEL_TUNINGS, PRECISIONS

    fields = AppArgs.model_fields
    assert get_args(fields["precision"].annotation) == PRECISIONS
    assert get_args(get_args(fields["compile"].annotation)[0]) == COMPILE_MODES
    assert get_args(fields["kernel_tuning"].annotation) == tuple(KERNEL_TUNINGS)
    assert get_args(fields["attention"].annotation) == ATTENTION_KERNELS


def test_app_args_refuse_inference_settings_that_do_not_go_together():
    """Settings that need compile are refused when the config loads (before, a replica failed to start)."""
    for setting in ({"dynamic_batch": True}, {"kernel_tuning": "conv1x1-mm"}, {"attention": "flex"}):
        with pytest.raises(ValidationError, match="needs compile"):
            AppArgs(**setting)
        assert AppArgs(**setting, compile="default").inference() == {
            **AppArgs().inference(), "compile": "default", **setting}


def test_app_args_refuse_storage_uris_no_store_can_open():
    assert AppArgs(compile_cache="s3://bucket/cache", output_uri="outputs/x").compile_cache == "s3://bucket/cache"
    for field, uri in (("compile_cache", "gs://bucket/cache"), ("output_uri", "s3:///x"), ("index_uri", "ftp://host/x")):
        with pytest.raises(ValidationError, match=field):
            AppArgs(**{field: uri})
    assert AppArgs(model="s3://models/rdm768.safetensors").model == "s3://models/rdm768.safetensors"
    for field, uri in (("model", "s3://models"), ("clip_weights", "s3://models/clip/")):
        with pytest.raises(ValidationError, match=f"{field}(.|\n)*needs a bucket and a key"):
            AppArgs(**{field: uri})


def test_retriever_options_are_exactly_the_sharded_retrievers_keyword_arguments():
    """A Serve config's retriever_options (and `rdm generate --retriever-options`) are validated against
    RetrieverOptions at start, so its fields and defaults must be ShardedRetriever's own."""
    import inspect

    from cluster.retriever import RetrieverOptions, ShardedRetriever

    keyword = {name: p.default for name, p in inspect.signature(ShardedRetriever).parameters.items()
               if p.kind is p.KEYWORD_ONLY}
    defaults = RetrieverOptions().model_dump()
    assert defaults == {**keyword, "resources": {}}  # ShardedRetriever takes None for no resources
    assert keyword["resources"] is None


def test_retriever_options_refuse_misspelled_keys_and_bad_values():
    from cluster.retriever import RetrieverOptions
    from rdm.errors import ConfigError

    assert AppArgs(retriever_options={"shards_per_actor": 4}).retriever_options.shards_per_actor == 4
    for bad, field in (({"shard_per_actor": 2}, "shard_per_actor"), ({"replicas": 0}, "replicas"),
                       ({"timeout_s": 0}, "timeout_s"), ({"resources": {"retriever": "one"}}, "resources")):
        with pytest.raises(ValidationError, match=field):
            AppArgs(retriever_options=bad)
    for bad in ("0", "2.5", '"all"', "true"):
        with pytest.raises(ConfigError, match=r"--retriever-options: shards_per_actor: .*>= 1 or 'auto'"):
            RetrieverOptions.from_json(f'{{"shards_per_actor": {bad}}}', where="--retriever-options")
    assert RetrieverOptions.from_json('{"shards_per_actor": "auto"}').shards_per_actor == "auto"
    with pytest.raises(ConfigError, match="Invalid JSON"):
        RetrieverOptions.from_json("{num_cpus: 1}")

