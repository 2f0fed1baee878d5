"""The pure parts of the registry origin: references, challenges, credentials, plain-HTTP policy, release parsing."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest

from edge_runtime.distribution.oci import (
    DEFAULT_TAG,
    MANIFEST_LAYER_TYPE,
    Descriptor,
    OciReference,
    parse_reference,
    read_release,
    release_artifact,
)
from edge_runtime.distribution.registry import registry_url, uses_plain_http
from edge_runtime.distribution.registry_auth import find_credentials, parse_challenge
from edge_runtime.distribution.schedule import RefreshSchedule
from edge_runtime.errors import InvalidAddress, InvalidManifest, RegistryAuthFailed, SourceUnavailable

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("oci://registry.example/fleet/adapters", OciReference("registry.example", "fleet/adapters", DEFAULT_TAG)),
    ("oci://127.0.0.1:5000/a:stable", OciReference("127.0.0.1:5000", "a", "stable")),
    ("oci://localhost:5000/org/team/adapters:v1.2_rc-3/", OciReference("localhost:5000", "org/team/adapters",
                                                                       "v1.2_rc-3")),
    ("oci://[::1]:5000/a", OciReference("[::1]:5000", "a", DEFAULT_TAG)),
])
def test_references_parse_host_repository_and_tag(text: str, expected: OciReference) -> None:
    assert parse_reference(text) == expected
    assert parse_reference(str(expected)) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("oci://registry.example", "is not a repository name"),
    ("oci://registry.example/Fleet/Adapters", "is not a repository name"),
    ("oci://registry.example/fleet/../etc", "is not a repository name"),
    ("oci://registry.example/fleet:-bad", "is not a tag"),
    ("oci://user@registry.example/fleet", "credentials do not belong"),
    ("oci:///fleet", "is not a registry host"),
    ("oci://127.0.0.1:99999/fleet", "port 99999 is not between 1 and 65535"),
    ("oci://127.0.0.1:0/fleet", "port 0 is not between 1 and 65535"),
    ("oci://127.0.0.1:5000/fleet@sha256:" + "ab" * 32, "is a digest; edge-rt follows a release by its tag"),
])
def test_malformed_references_name_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(InvalidAddress, match=problem) as caught:
        parse_reference(text)
    assert caught.value.exit_code == 2  # a usage mistake, found before anything is fetched or pushed
    assert str(caught.value).endswith("Spell a registry as oci://HOST[:PORT]/REPOSITORY[:TAG]") or "digest" in problem \
        or "credentials" in problem


def test_a_password_in_a_reference_never_reaches_the_error() -> None:
    for text in ("oci://alice:s3cret-pw@127.0.0.1:5000/fleet/adapters:v1",
                 "oci://alice:s3cret/pw@127.0.0.1:5000/fleet/adapters:v1"):  # a '/' in the password
        with pytest.raises(SourceUnavailable, match="EDGE_RT_REGISTRY_USERNAME/PASSWORD") as caught:
            parse_reference(text)
        assert "s3cret" not in str(caught.value) and "s3cret" not in repr(caught.value.__dict__)
        assert "oci://127.0.0.1:5000/fleet/adapters:v1" in str(caught.value)


def test_plain_http_only_for_loopback_or_listed_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(registry_url(parse_reference("oci://127.0.0.1:5000/a"))) == "http://127.0.0.1:5000/v2/a"
    assert uses_plain_http(parse_reference("oci://localhost/a")) and uses_plain_http(parse_reference("oci://[::1]/a"))
    public = parse_reference("oci://registry.example:5000/fleet/adapters")
    assert str(registry_url(public)) == "https://registry.example:5000/v2/fleet/adapters"
    assert not uses_plain_http(parse_reference("oci://10.0.0.5/a"))  # private is not loopback: HTTPS
    monkeypatch.setenv("EDGE_RT_INSECURE_REGISTRIES", "other.example, REGISTRY.example:5000")
    assert str(registry_url(public)).startswith("http://")
    assert not uses_plain_http(parse_reference("oci://registry.example:6000/a"))


def test_challenges_parse_quoted_parameters_with_commas() -> None:
    scheme, params = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                                     'scope="repository:fleet/adapters:pull,push",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:fleet/adapters:pull,push", "error": "insufficient_scope"}
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})


def _config(data: object) -> None:
    folder = Path(os.environ["DOCKER_CONFIG"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))


def test_credentials_come_from_the_environment_first_then_docker_auths(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_credentials("registry.example") is None  # no config.json at all: anonymous
    encoded = base64.b64encode(b"robot:pa:ss").decode()  # the password may hold ':'
    _config({"auths": {"https://registry.example:5000/v1/": {"auth": encoded},
                       "other.example": {"username": "u", "password": "p"}}})
    found = find_credentials("registry.example:5000")
    assert found is not None and (found.username, found.password) == ("robot", "pa:ss")
    assert "pa:ss" not in repr(found)
    other = find_credentials("OTHER.example")
    assert other is not None and (other.username, other.password) == ("u", "p")
    assert find_credentials("registry.example") is None  # another port is another registry
    monkeypatch.setenv("EDGE_RT_REGISTRY_USERNAME", "ci")
    monkeypatch.setenv("EDGE_RT_REGISTRY_PASSWORD", "token")
    env = find_credentials("registry.example:5000")
    assert env is not None and (env.username, env.password) == ("ci", "token")


@pytest.mark.parametrize(("config", "problem"), [
    ({"auths": {"registry.example": {"auth": "bm8tY29sb24="}}}, "no ':' between user and password"),
    ({"auths": {"registry.example": {"auth": "***"}}}, "is not base64"),
    ({"auths": {"registry.example": {"identitytoken": "x"}}}, "identity token"),
])
def test_unusable_docker_auths_are_typed_errors(config: object, problem: str) -> None:
    _config(config)
    with pytest.raises(RegistryAuthFailed, match=problem) as caught:
        find_credentials("registry.example")
    assert caught.value.exit_code == 11


def test_a_corrupt_docker_config_is_a_typed_error() -> None:
    folder = Path(os.environ["DOCKER_CONFIG"])
    folder.mkdir(parents=True)
    for broken in ("{not json", "[" * 100_000, '{"auths": ' + "9" * 5000 + "}"):
        (folder / "config.json").write_text(broken)
        with pytest.raises(RegistryAuthFailed, match="cannot read"):
            find_credentials("registry.example")


def test_a_release_names_exactly_one_signed_document() -> None:
    layer = Descriptor(MANIFEST_LAYER_TYPE, DIGEST, 1234)
    body = release_artifact(document=layer, blobs=[Descriptor("application/vnd.docker.ai.gguf.v3.lora", DIGEST, 9)],
                            version=3, created="2026-01-01T00:00:00Z")
    assert read_release(body, source="t") == layer
    data = json.loads(body)
    huge_int = b'{"schemaVersion": ' + b"9" * 5000 + b"}"  # json.loads: ValueError, not JSONDecodeError
    for broken, field in [(b"not json", None), (b"[" * 100_000, None), (huge_int, None),
                          (json.dumps({**data, "schemaVersion": 1}).encode(), "schemaVersion"),
                          (json.dumps({**data, "layers": data["layers"][1:]}).encode(), "layers"),
                          (json.dumps({**data, "layers": data["layers"][:1] * 2}).encode(), "layers"),
                          (json.dumps({**data, "layers": [{**data["layers"][0], "digest": "md5:x"}]}).encode(),
                           "layers[].digest"),
                          (json.dumps({**data, "layers": [{**data["layers"][0], "size": -1}]}).encode(),
                           "layers[].size")]:
        with pytest.raises(InvalidManifest) as caught:
            read_release(broken, source="t")
        assert caught.value.field == field and caught.value.exit_code == 9


def test_refreshes_spread_over_the_window_drift_apart_and_back_off() -> None:
    schedule = RefreshSchedule(interval_s=60.0, jitter=0.25, start_window_s=30.0, backoff_base_s=2.0,
                               backoff_max_s=100.0)
    rng = random.Random(7)
    starts = [schedule.start_delay(rng) for _ in range(2000)]
    assert 0.0 <= min(starts) and max(starts) <= 30.0
    assert all(150 <= sum(1 for s in starts if k * 3 <= s < (k + 1) * 3) <= 250 for k in range(10))  # ~uniform
    assert schedule.start_delay(rng, has_cache=False) == 0.0
    periods = [schedule.next_delay(rng) for _ in range(2000)]
    assert 45.0 <= min(periods) < 47.0 and 73.0 < max(periods) <= 75.0
    for failures, (low, high) in {1: (1, 2), 2: (2, 4), 5: (16, 32), 9: (50, 100), 40: (50, 100)}.items():
        waits = [schedule.next_delay(rng, failures=failures) for _ in range(200)]
        assert low <= min(waits) and max(waits) <= high
