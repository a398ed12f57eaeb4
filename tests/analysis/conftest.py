"""One report of the tiny store, built once through the CLI command and shared by the tests."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from selfrepair.analysis.report import build_report
from selfrepair.queries.store import Store


@pytest.fixture(scope="session")
def tiny_query_store(tiny_store):
    with Store.open(tiny_store) as s:
        yield s


@pytest.fixture(scope="session")
def report_dir(tiny_store, tmp_path_factory):
    """`selfrepair report` over all three tiny models, every figure and table."""
    from selfrepair.cli_report import report

    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(report, ["--store", str(tiny_store), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out / 'report.html'} (")
    return out


@pytest.fixture(scope="session")
def built(tiny_query_store, tmp_path_factory):
    """The Python API's Report (entries with the frames drawn), for the data checks."""
    return build_report(tiny_query_store, tmp_path_factory.mktemp("report-api"))
