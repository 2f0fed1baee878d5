"""Parsing a request's adapters: typed once (``AdapterRequest``), checked against the catalog without copying it."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from edge_runtime.errors import AdapterNotFound, InvalidName, InvalidRequest
from edge_runtime.runtime.requests import AdapterRequest
from edge_runtime.serve.openai_api import parse_request


class CountingCatalog:
    """A catalog of adapter names that counts how often it is listed whole."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = set(names)
        self.listed = 0

    def is_known(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        self.listed += 1
        return sorted(self._names)

    def refusal(self, name: str) -> str | None:
        return None  # nothing refused (issue 18 item 17: the 404 says why a refused name is not served)


def _parse(body: dict[str, object], catalog: CountingCatalog) -> tuple[AdapterRequest, ...]:
    return parse_request(body, chat=False, base_id="base", known_adapters=catalog, max_tokens_cap=64).adapters


def test_known_adapters_are_found_without_listing_a_large_catalog() -> None:
    catalog = CountingCatalog(f"adapter-{i}" for i in range(40_000))
    assert _parse({"prompt": "Hi", "model": "adapter-7"}, catalog) == (AdapterRequest("adapter-7", 1.0),)
    composed = _parse({"prompt": "Hi", "adapters": [{"name": "adapter-1", "scale": 0.5}, {"name": "adapter-2"}]},
                      catalog)
    assert composed == (AdapterRequest("adapter-1", 0.5), AdapterRequest("adapter-2", 1.0))
    assert _parse({"prompt": "Hi", "model": "base"}, catalog) == ()
    assert catalog.listed == 0


def test_an_unknown_adapter_names_the_known_ones_in_its_error() -> None:
    catalog = CountingCatalog(["legal", "brand"])
    with pytest.raises(AdapterNotFound) as raised:
        _parse({"prompt": "Hi", "adapter": "medical"}, catalog)
    assert "medical" in str(raised.value) and "brand" in str(raised.value) and raised.value.http_status == 404
    assert catalog.listed == 1


def test_a_name_that_could_become_a_path_is_refused_where_the_request_is_parsed() -> None:
    catalog = CountingCatalog(["legal"])
    with pytest.raises(InvalidName):
        _parse({"prompt": "Hi", "adapter": "../../etc/passwd"}, catalog)
    with pytest.raises(InvalidName):
        AdapterRequest("a/b")
    with pytest.raises(InvalidRequest, match="appears twice"):
        _parse({"prompt": "Hi", "adapters": [{"name": "legal"}, {"name": "legal", "scale": 0.5}]}, catalog)
