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


# Every unit kind of the tiny GPT-2 (2 layers × 4 heads), a named group, and each unit again given L0H1.
UNIT_STORE = dict(tokens=124, seq_len=32, batch_size=4, ablations=("resample", "zero"), resamples=2,
                  units="heads,mlps,attn,blocks,bk=L1H0+L1H3", given=("L0H1",), top_p=0.05, neurons_top_k=3)


@pytest.fixture(scope="session")
def unit_store(tiny_stores, tmp_path_factory):
    """A tiny GPT-2 store holding heads, a named group, ATTN, MLP and BLOCK units, alone and given L0H1."""
    return tiny_stores.copy("gpt2", tmp_path_factory.mktemp("units") / "s", **UNIT_STORE)
