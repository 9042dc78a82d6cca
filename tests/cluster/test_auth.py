"""Named client keys (`cluster.serve.auth`, `rdm keys`)."""

import asyncio
import json
import logging
import math
import os

import pytest
from fastapi import Response

from cluster.serve.auth import (
    SHARED_CLIENT,
    Authenticator,
    RateLimiter,
    SavedAllowances,
    add_key,
    digest,
    read_keys,
    read_token_file,
    revoke_key,
)
from jobs.cli import main as rdm
from rdm.errors import ConfigError, InputError


def test_rdm_keys_adds_lists_and_revokes_keeping_only_digests(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert rdm(["keys", "add", "team-a", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert len(key) >= 40 and key not in path.read_text()  # shown once, stored as its digest
    assert json.loads(path.read_text()) == {"keys": {"team-a": digest(key)}}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert rdm(["keys", "add", "team-b", "--file", str(path)]) == 0
    capsys.readouterr()
    assert rdm(["keys", "list", "--file", str(path)]) == 0 and capsys.readouterr().out.split() == ["team-a", "team-b"]
    assert rdm(["keys", "revoke", "team-a", "--file", str(path)]) == 0 and list(read_keys(path)) == ["team-b"]
    assert rdm(["keys", "add", "team-b", "--file", str(path)]) == 2
    assert "already has a key" in capsys.readouterr().err
    assert rdm(["keys", "revoke", "nobody", "--file", str(path)]) == 2
    assert rdm(["keys", "add", "Bad Name!", "--file", str(path)]) == 2


def test_a_token_maps_to_its_client_and_file_changes_apply_at_the_next_request(tmp_path, caplog):
    path = tmp_path / "keys.json"
    key_a = add_key(path, "team-a")
    auth = Authenticator("shared-secret", str(path))
    assert auth.client("shared-secret") == SHARED_CLIENT and auth.client(key_a) == "team-a"
    assert auth.client("wrong") is None and auth.client("") is None and auth.client(digest(key_a)) is None
    key_b = add_key(path, "team-b")  # added while running: taken at once
    assert auth.client(key_b) == "team-b"
    revoke_key(path, "team-a")  # revoked while running: refused at once
    assert auth.client(key_a) is None and auth.client(key_b) == "team-b"
    path.write_text("{not json")  # a broken edit keeps the keys in force, never none (or all)
    with caplog.at_level(logging.ERROR):
        assert auth.client(key_b) == "team-b" and auth.client(key_a) is None
    assert "keeping the 1 client keys in force" in caplog.text
    path.unlink()  # a file that vanished likewise
    assert auth.client(key_b) == "team-b"


def test_a_bad_keys_file_at_start_is_a_config_error(tmp_path):
    for text, match in (("{not json", "not JSON"), ('{"keys": ["a"]}', "expected"),
                        ('{"keys": {"a": "plaintext-key"}}', "sha256"), ('{"keys": {"A B": "sha256:' + "0" * 64 + '"}}',
                                                                          "needs a name")):
        (tmp_path / "keys.json").write_text(text)
        with pytest.raises(ConfigError, match=match):
            Authenticator(None, str(tmp_path / "keys.json"))
    with pytest.raises(ConfigError, match="cannot be read"):
        Authenticator(None, str(tmp_path / "missing.json"))
    assert not Authenticator(None, None).enabled and Authenticator("t", None).enabled


def test_the_ingress_records_the_client_of_each_request(tmp_path):
    """The route answers 401 without a known key, and hands the caller's client name to the request."""
    import asyncio

    from fastapi import HTTPException
    from starlette.requests import Request

    from cluster.serve import deployments
    from cluster.serve.schemas import GenerateRequest

    key = add_key(tmp_path / "keys.json", "team-a")
    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    counted, seen = [], []
    ingress.auth, ingress.allowances = Authenticator(None, str(tmp_path / "keys.json")), None
    ingress.limiter = RateLimiter(None)
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: counted.append(tags)})()

    async def generate(body, request_id, client):
        seen.append(client)
        return {"ok": True}

    ingress._generate = generate

    def request(token: str) -> Request:
        return Request({"type": "http", "method": "POST", "headers": [(b"authorization", f"Bearer {token}".encode())]})

    assert asyncio.run(ingress.generate(GenerateRequest(prompt="a boat"), request(key), Response())) == {"ok": True}
    assert seen == ["team-a"] and counted == [{"route": "generate", "status": "200", "client": "team-a"}]
    with pytest.raises(HTTPException) as refused:
        asyncio.run(ingress.generate(GenerateRequest(prompt="a boat"), request("not-a-key"), Response()))
    assert refused.value.status_code == 401 and seen == ["team-a"]


def test_client_names_are_checked_when_adding(tmp_path):
    with pytest.raises(InputError, match="client name"):
        add_key(tmp_path / "k.json", "-leading-dash")


def test_the_token_file_is_read_stripped_and_a_missing_or_empty_one_is_a_config_error(tmp_path):
    """An empty file used to give no token: an app without require_token then served without auth."""
    (tmp_path / "token").write_text("s3cret\n")
    assert read_token_file(str(tmp_path / "token")) == "s3cret" and read_token_file(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot be read .No such file or directory.; mount it"):
        read_token_file(str(tmp_path / "missing"))


def test_each_client_has_its_own_allowance_of_images_per_minute():
    now = [0.0]
    limiter = RateLimiter(60, {"big": 600}, clock=lambda: now[0])
    assert [limiter.wait_s("a", 8) for _ in range(7)] == [0.0] * 7  # a minute's worth at once: 56 of 60
    assert limiter.wait_s("a", 8) == pytest.approx(4.0)  # 4 left, 1 a second: 4 s until 8 fit (nothing taken)
    assert limiter.wait_s("b", 8) == 0.0 and limiter.wait_s("big", 8) == 0.0  # others have their own
    now[0] = 4.0
    assert limiter.wait_s("a", 8) == 0.0 and limiter.wait_s("a", 1) == pytest.approx(1.0)
    now[0] = 1000.0  # refills up to one minute's worth, not more
    assert [limiter.wait_s("a", 6) for _ in range(11)][-1] == pytest.approx(6.0)
    assert limiter.wait_s("a", 61) == float("inf")
    assert RateLimiter(None).wait_s("anyone", 8) == 0.0 and RateLimiter(None, {"x": 8}).limit("x") == 8
    assert limiter.remaining("a") == 0 and limiter.remaining("b") == 60 and RateLimiter(None).remaining("x") is None
    limiter.refund("a", 6)  # a request that got nothing: its images back, up to a minute's worth
    assert limiter.wait_s("a", 6) == 0.0
    limiter.refund("a", 100)
    assert [limiter.wait_s("a", 6) for _ in range(11)][-1] > 0


def test_exported_buckets_are_restored_refilled_for_the_time_since():
    now = [0.0]
    limiter = RateLimiter(8, {"big": 600, "freed": 8}, clock=lambda: now[0])
    for client, images in (("a", 6), ("b", 1), ("big", 500), ("freed", 8), ("full", 0)):
        assert limiter.wait_s(client, images) == 0.0
    now[0] = 7.5  # a: 2 + 1 refilled; b: full again (7 + 1)
    assert limiter.export() == pytest.approx({"a": 3.0, "big": 175.0, "freed": 1.0})
    # limits changed: "big" lowered, "freed" unlimited now
    later = RateLimiter(None, {"a": 8, "b": 8, "big": 100}, clock=lambda: 50.0)
    later.restore(limiter.export(), elapsed_s=15.0)  # 2 more a client of 8 a minute
    assert (later.remaining("a"), later.remaining("b"), later.remaining("big")) == (5, 8, 100)
    assert later.remaining("freed") is None and later.wait_s("freed", 8) == 0.0
    later.restore({"a": 1.0}, elapsed_s=-30.0)  # a clock behind the saver's: no refill, never less
    assert later.remaining("a") == 1


def test_saved_allowances_are_written_after_a_change_and_survive_a_bad_file(tmp_path, caplog):
    from cluster.storage import LocalStore

    store, now = LocalStore(tmp_path), [1000.0]
    saved = SavedAllowances(store, "_state/allowances-app.json", clock=lambda: now[0])
    limiter = RateLimiter(60)
    assert saved.load(limiter) == 0 and not saved.save(limiter)  # nothing saved, nothing changed
    limiter.wait_s("a", 50)
    assert saved.save(limiter) and not saved.save(limiter)  # once per change
    now[0] = 1005.0  # restored 5 s later: 10 + 5 images
    restored = RateLimiter(60)
    assert SavedAllowances(store, "_state/allowances-app.json", clock=lambda: now[0]).load(restored) == 1
    assert restored.remaining("a") == 15 and restored.remaining("b") == 60
    (tmp_path / "_state" / "allowances-app.json").write_text('{"saved_at": "yesterday"')
    fresh = RateLimiter(60)
    with caplog.at_level(logging.WARNING, logger="cluster.serve.auth"):
        assert saved.load(fresh) == 0 and fresh.remaining("a") == 60
    assert "cannot be read (JSONDecodeError" in caplog.text and "every client starts with a full minute" in caplog.text


def test_a_restarted_allowances_replica_goes_on_from_the_saved_buckets(tmp_path):
    """The Allowances replica Serve starts after one died (saved within its save interval) or was stopped
    (saved as it stopped) does not give every client a full minute again."""
    import time

    from cluster.serve.deployments import Allowances

    async def take(replica, client, images):
        return await replica.take(client, images)

    first = Allowances.func_or_class(8, {}, str(tmp_path), save_interval_s=0.05)
    assert asyncio.run(take(first, "team", 6)) == (0.0, 8, 2)
    state = tmp_path / "_state" / "allowances-app.json"
    deadline = time.monotonic() + 10
    while not state.exists():  # saved by its thread, without a stop (a replica that died)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = Allowances.func_or_class(8, {}, str(tmp_path), save_interval_s=3600)
    wait_s, _, left = asyncio.run(take(second, "team", 4))
    assert left == 2 and 14 < wait_s <= 15  # 2 in hand (and a bit), 8 a minute: 2 more in under 15 s
    assert asyncio.run(take(second, "team", 2))[0] == 0.0
    second.__del__()  # stopped by Serve: saved at once, whatever the interval
    third = Allowances.func_or_class(8, {}, str(tmp_path))
    assert asyncio.run(take(third, "team", 1))[2] == 0  # ~0.2 images in hand after 8 taken
    assert asyncio.run(take(Allowances.func_or_class(8, {}), "team", 8))[0] == 0.0  # kept nowhere: full


def test_the_ingress_answers_a_client_past_its_allowance_with_429_and_retry_after():
    import asyncio
    import json

    from cluster.serve import deployments
    from cluster.serve.schemas import GenerateRequest

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    counted, calls = [], []
    ingress.auth, ingress.limiter, ingress.allowances = Authenticator(None, None), RateLimiter(8), None
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: counted.append(tags)})()

    async def generate(body, request_id, client):
        calls.append(body.num_images)
        if body.prompt == "bad":
            raise InputError("prompt: bad")
        return {"ok": True}

    ingress._generate = generate
    failed = asyncio.run(ingress.generate(GenerateRequest(prompt="bad", num_images=6), None, Response()))
    assert failed.status_code == 422  # no images: its 6 are given back, or the next request would be a 429
    assert asyncio.run(ingress.generate(GenerateRequest(prompt="a boat", num_images=6), None, Response())) == {"ok": True}
    response = asyncio.run(ingress.generate(GenerateRequest(prompt="a boat", num_images=4), None, Response()))
    body = json.loads(response.body)["error"]
    assert response.status_code == 429 and body["type"] == "rate_limited" and calls == [6, 6]
    assert response.headers["retry-after"] == "15" and "'anonymous' is past its 8 images per minute" in body["message"]
    assert counted[-1] == {"route": "generate", "status": "429", "client": ""}
    never = deployments._rate_limited("team-a", 8, float("inf"), "r1")
    assert never.status_code == 429 and "retry-after" not in never.headers
    assert "which this request alone exceeds" in json.loads(never.body)["error"]["message"]


@pytest.mark.parametrize("cost, answered", [(1.0, 8), (0.5, 16), (0.0, 20)])
def test_neighbours_queries_take_their_cost_from_the_same_allowance(cost, answered):
    """`POST /v1/neighbors` costs `neighbor_query_cost` images of the client's allowance (each is a CLIP
    embedding on the Generator's queue): past it, 429 + Retry-After, as for images; 0 leaves them unlimited."""
    import asyncio
    import json

    from cluster.serve import deployments
    from cluster.serve.schemas import AppArgs, NeighborsRequest

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.auth, ingress.allowances = Authenticator(None, None), None
    ingress.limiter = RateLimiter(8, clock=lambda: 0.0)  # no refill while the test runs
    ingress.args, ingress._pending = AppArgs(neighbor_query_cost=cost), set()
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: None})()

    async def neighbors(body, request_id):
        return {"ok": True}

    ingress._neighbors = neighbors
    answers = [asyncio.run(ingress.neighbors(NeighborsRequest(prompt="a boat", database="art"), None, Response()))
               for _ in range(20)]
    assert sum(answer == {"ok": True} for answer in answers) == answered
    if answered < 20:
        refused = answers[answered]
        assert refused.status_code == 429 and json.loads(refused.body)["error"]["type"] == "rate_limited"
        assert int(refused.headers["retry-after"]) == math.ceil(cost * 60 / 8)


class _Handle:
    """A DeploymentHandle's calling convention (`handle.method.remote(...)` -> awaitable with `cancel()`)
    in one event loop, over a real `Allowances` instance; `hang` makes every call wait forever."""

    def __init__(self, target, hang: bool = False) -> None:
        self.target, self.hang, self.cancelled = target, hang, 0

    def __getattr__(self, method):
        handle = self

        class Call:
            def remote(self, *args):
                async def run():
                    if handle.hang:
                        await asyncio.sleep(3600)
                    return await getattr(handle.target, method)(*args)

                return Response(run())

        class Response:
            def __init__(self, coro) -> None:
                self.coro = coro

            def __await__(self):
                return self.coro.__await__()

            def cancel(self):
                handle.cancelled += 1

        return Call()


def _ingress(allowances, local_limit: int | None = 8, store=None):
    import tempfile

    from cluster.serve import deployments
    from cluster.storage import LocalStore

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.auth, ingress.limiter, ingress.allowances = Authenticator(None, None), RateLimiter(local_limit), allowances
    ingress.store, ingress._alone = store or LocalStore(tempfile.mkdtemp()), False
    ingress._pending = set()
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: None})()

    async def generate(body, request_id, client):
        if body.prompt == "bad":
            raise InputError("prompt: bad")
        return {"ok": body.num_images}

    ingress._generate = generate
    return ingress


def test_every_ingress_replica_takes_from_the_apps_one_allowance():
    """Two Ingress replicas share one Allowances replica: a client's 8 images a minute are 8 for the app,
    not 8 per replica; a refused request's images go back to the shared allowance."""
    from cluster.serve import deployments
    from cluster.serve.schemas import GenerateRequest

    shared = deployments.Allowances.func_or_class(8, {})
    first, second = _ingress(_Handle(shared)), _ingress(_Handle(shared))

    async def scenario():
        reply = Response()
        assert await first.generate(GenerateRequest(prompt="a boat", num_images=6), None, reply) == {"ok": 6}
        assert (reply.headers["ratelimit-limit"], reply.headers["ratelimit-remaining"]) == ("8", "2")
        refused = await second.generate(GenerateRequest(prompt="a boat", num_images=4), None, Response())
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) == 15  # 2 left, 8 a minute
        assert refused.headers["ratelimit-remaining"] == "2"
        assert (await second.generate(GenerateRequest(prompt="bad", num_images=2), None, Response())).status_code == 422
        await asyncio.gather(*second._pending)  # the refund is sent without waiting for it
        assert await first.generate(GenerateRequest(prompt="a boat", num_images=2), None, Response()) == {"ok": 2}
        return await first.generate(GenerateRequest(prompt="a boat", num_images=1), None, Response())

    assert asyncio.run(scenario()).status_code == 429
    assert first.limiter.wait_s("", 8) == 0.0  # the replicas' own buckets were never used


def test_an_ingress_counts_alone_while_the_allowances_replica_does_not_answer(caplog):
    from cluster.serve import deployments
    from cluster.serve.schemas import GenerateRequest

    handle = _Handle(deployments.Allowances.func_or_class(8, {}), hang=True)
    ingress = _ingress(handle)
    ingress.allowance_timeout_s = 0.05

    async def scenario():
        failed = await ingress.generate(GenerateRequest(prompt="bad", num_images=8), None, Response())
        assert failed.status_code == 422 and not ingress._pending  # given back here, where it was counted
        ok = await ingress.generate(GenerateRequest(prompt="a boat", num_images=8), None, Response())
        return ok, await ingress.generate(GenerateRequest(prompt="a boat", num_images=1), None, Response())

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        ok, refused = asyncio.run(scenario())
    assert ok == {"ok": 8} and refused.status_code == 429 and handle.cancelled == 3
    assert "allowances unreachable (TimeoutError" in caplog.text


def test_an_ingress_counting_alone_starts_from_the_buckets_the_allowances_replica_saved(tmp_path):
    """An outage of the Allowances replica does not hand every client a full minute on every Ingress replica:
    counting alone starts from the buckets that replica last saved (and again at the next outage)."""
    from cluster.serve import deployments
    from cluster.serve.schemas import GenerateRequest
    from cluster.storage import LocalStore

    shared = deployments.Allowances.func_or_class(8, {}, str(tmp_path), save_interval_s=3600)
    handle = _Handle(shared)
    ingress = _ingress(handle, store=LocalStore(tmp_path))
    ingress.allowance_timeout_s = 0.05

    async def scenario():
        assert await ingress.generate(GenerateRequest(prompt="a boat", num_images=6), None, Response()) == {"ok": 6}
        shared.saved.save(shared.limiter)  # as its thread does within a second
        handle.hang = True  # the Allowances replica stops answering
        refused = await ingress.generate(GenerateRequest(prompt="a boat", num_images=4), None, Response())
        fits = await ingress.generate(GenerateRequest(prompt="a boat", num_images=2), None, Response())
        return refused, fits

    refused, fits = asyncio.run(scenario())
    assert refused.status_code == 429 and fits == {"ok": 2}  # 2 left of 8, as the app had counted
    assert ingress._alone and ingress.limiter.remaining("") == 0


def test_ingress_replicas_counting_alone_share_what_was_left(tmp_path):
    """N Ingress replicas that count alone during an outage each take 1/N of what the app had left and of the
    allowance (together the app's, not N times it), never less than one request's images; replicas it cannot
    count are taken as one."""
    from cluster.serve import deployments
    from cluster.serve.auth import SavedAllowances
    from cluster.storage import LocalStore

    store = LocalStore(tmp_path)
    limiter = RateLimiter(24, {"big": 120})
    assert limiter.wait_s("", 12) == 0 and limiter.wait_s("big", 60) == 0  # the app had 12 and 60 left
    SavedAllowances(store, deployments.ALLOWANCES_STATE.format(app="app")).save(limiter)
    ingress = _ingress(_Handle(None), store=store)
    ingress.limiter = RateLimiter(24, {"big": 120})  # the app's allowances, as AppArgs gives them
    ingress._replica_count = lambda: 3  # (Serve's ingress wrapper copies the module's globals: no monkeypatch)
    ingress._count_from_saved()
    assert ingress.limiter.remaining("big") == 20 and ingress.limiter.limit("big") == 120  # 60 / 3; the header's
    assert ingress.limiter.remaining("") == 4  # 12 / 3, in a bucket of 8 (24 / 3)
    assert ingress.limiter.wait_s("", 8) > 0 and ingress.limiter.wait_s("", 4) == 0
    assert ingress.limiter.wait_s("", 9) == float("inf")  # a bucket of 8: a request of 9 never fits here
    assert RateLimiter(8, share=1 / 3, floor=8).remaining("") == 8  # 8 / 3 < one request: the floor
    assert deployments._running_replicas() == 1  # outside a replica: cannot tell


@pytest.mark.parametrize("options, ok", [({}, True), ({"num_replicas": 1}, True), ({"num_replicas": 2}, False),
                                         ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}, False)])
def test_the_allowances_deployment_runs_one_replica(options, ok):
    from cluster.serve.config import check_deployment

    if ok:
        assert check_deployment({"name": "Allowances", **options}, "here") == ("Allowances", options)
    else:
        with pytest.raises(ConfigError, match="exactly one replica"):
            check_deployment({"name": "Allowances", **options}, "here")


def test_the_app_binds_allowances_only_where_images_per_minute_are_set():
    from cluster.serve.app import build_app

    plain = build_app({"model": "tiny"})  # private Serve attributes: what Ingress is bound to
    limited = build_app({"model": "tiny", "client_images_per_minute": {"x": 8}})
    assert plain._bound_deployment.init_args[3] is None
    assert limited._bound_deployment.init_args[3]._bound_deployment.name == "Allowances"
    # its buckets are kept in the app's output store
    assert limited._bound_deployment.init_args[3]._bound_deployment.init_args == (None, {"x": 8}, "outputs/serve")
