"""One report of the tiny store, built once and shared by the tests."""

from __future__ import annotations

import pytest

from selfrepair.analysis.report import build_report
from selfrepair.queries.store import Store


@pytest.fixture(scope="session")
def tiny_query_store(tiny_store):
    with Store.open(tiny_store) as s:
        yield s


@pytest.fixture(scope="session")
def built(tiny_query_store, tmp_path_factory):
    """The report of all three tiny models, every figure and table (entries keep the frames drawn)."""
    return build_report(tiny_query_store, tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="session")
def report_dir(built):
    """The folder `built` wrote (the CLI is exercised in test_analysis_cli.py)."""
    return built.path.parent
