from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.audit.harness import Keys, make_keys
from tests.postgres import throwaway_database


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One database per test module and backend; tests keep apart by using fresh user ids."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('audit')}/audit.db"
    else:
        with throwaway_database() as url:
            yield url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))
