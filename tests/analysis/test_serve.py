"""`selfrepair serve` (issue 23): one real server over the shared unit store for the whole module, read in
headless Chromium and over plain HTTP: the index links every stored unit, pages render with their script
running, a SQL box answers and refuses what the sandbox refuses, nothing but GET succeeds, a unit the
store does not hold gets a page saying what is stored, and the store's files stay byte-identical.
The terminal, the HTML file, the server and the notebook show the same figures (one data function)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from click.testing import CliRunner
from chromium_page import run_chromium
from tiny_models import tree_hashes

from selfrepair.analysis.page_format import number
from selfrepair.cli import main

MODEL = "tiny-gpt2"
STORED = "heads all (8), group bk=L1H0+L1H3, ATTN0..1, MLP0..1, BLOCK0..1"


@dataclass
class Server:
    url: str
    store: Path
    before: tuple


def _snapshot(root: Path) -> tuple:
    """Every file's sha256 and every path (folders too): equal when nothing under `root` changed."""
    return tree_hashes(root), sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def server(unit_store):
    """`selfrepair serve` over the unit store, as a real process on a free port (one per module)."""
    before = _snapshot(unit_store)
    proc = subprocess.Popen([sys.executable, "-m", "selfrepair", "serve", "--store", str(unit_store), "--port", "0",
                             "--report-figures", "fig_backup_map"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "Serving S at http://127.0.0.1:PORT/ (Ctrl-C to stop)"
    found = re.search(r" at (http://127\.0\.0\.1:\d+/) ", line)
    if not found:
        proc.kill()
        pytest.fail(f"serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    yield Server(found.group(1), unit_store, before)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def fetch(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str]:
    """(status, body) of one request; an HTTP error status is an answer, not an exception."""
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=b"x=1" if method in ("POST", "PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def dom(url: str, tmp_path) -> str:
    """The page after its scripts ran, in headless Chromium."""
    out = run_chromium(["--dump-dom", url], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def unit_url(server: Server, label: str, **params) -> str:
    query = f"?{urlencode(params)}" if params else ""
    return f"{server.url}model/{MODEL}/unit/{quote(label, safe='')}{query}"


def _status(page: str) -> dict:
    """The unit page's script's record: tokens it coloured, script errors."""
    found = re.search(r'class="page-status" data-coloured="(\d*)" data-errors="(\d*)"', page)
    assert found, "the page's script did not run"
    return {"coloured": int(found.group(1)), "errors": int(found.group(2))}


# -- pages -------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_the_index_links_every_stored_unit_and_the_links_work(server, tmp_path):
    from selfrepair.analysis.units import StoredUnits
    from selfrepair.analysis.notebook import Store

    page = dom(server.url, tmp_path)
    hrefs = set(re.findall(r'href="([^"]+)"', page))
    with Store.open(server.store) as s:
        stored = StoredUnits.of(s, MODEL)
    want = set()
    for ablation, sample, cond, label in stored.rows:
        params = {"ablation": ablation, "sample": sample} | ({"given": cond} if cond else {})
        want.add(f"/model/{MODEL}/unit/{quote(label, safe='')}?{urlencode(params)}".replace("&", "&amp;"))
    assert want <= hrefs and len(want) == len(stored.rows) == 81
    assert {"/", "/report/", "/sql"} <= hrefs
    # The kinds no other test here opens (heads, groups and conditions are), and the zero ablation, answer.
    for href in (f"/model/{MODEL}/unit/ATTN1?ablation=resample&sample=0",
                 f"/model/{MODEL}/unit/BLOCK0?ablation=zero&sample=0"):
        assert href.replace("&", "&amp;") in want
        status, body = fetch(server.url.rstrip("/") + href)
        assert status == 200 and f'data-head="{href.split("/unit/")[1].split("?")[0]}"' in body, (href, status)
    status, body = fetch(server.url + "sql")
    assert status == 200 and "<textarea" in body


@pytest.mark.browser
def test_a_head_page_renders_with_its_script_and_its_links_work(server, tmp_path):
    page = dom(unit_url(server, "L1H2"), tmp_path)
    assert _status(page) == {"coloured": _status(page)["coloured"], "errors": 0} and _status(page)["coloured"] > 0
    assert page.count('<span class="tok">') == 6  # every top token (6 at p = 0.05), each boxed in its text
    assert page.count('data-att="') >= 6 and 'value="att"' in page  # attention drawn over the text
    lens = page.split('id="lens"')[1].split("</section>")[0]
    assert lens.count('<code class="tokstr">') == 20 and "From head L1H2 (z @ W_O)" in lens
    links = sorted(set(re.findall(r'<a class="unit" href="([^"]+)"', page)))
    assert links and all("/unit/" in h for h in links)
    for href in links:
        status, body = fetch(server.url.rstrip("/") + href.replace("&amp;", "&"))
        assert status == 200 and "data-head=" in body, href


@pytest.mark.browser
def test_a_group_page_given_a_condition_links_its_members_and_condition(server, tmp_path):
    page = dom(unit_url(server, "bk", given="L0H1"), tmp_path)
    assert _status(page)["errors"] == 0 and _status(page)["coloured"] > 0
    assert 'data-head="bk" data-unit-kind="group" data-condition="L0H1"' in page
    named = page.split('class="named"')[1]
    for label in ("L1H0", "L1H3"):
        assert f'href="/model/{MODEL}/unit/{label}?' in named
    assert 'value="att"' not in page and "Where it attends" not in page  # attention: heads only


@pytest.mark.browser
def test_the_sql_box_answers(server, tmp_path):
    q = f"SELECT count(*) AS n FROM tokens WHERE model = '{MODEL}'"
    page = dom(f"{server.url}sql?{urlencode({'q': q})}", tmp_path)
    assert 'id="sql-rows" data-rows="1"' in page and "<td>124</td>" in page


HOSTILE = [
    "COPY (SELECT 1) TO '{out}'",
    "ATTACH '{out}' AS x",
    "SELECT * FROM read_csv('/etc/passwd')",
    "INSTALL httpfs",
    "SELECT 1; DROP VIEW tokens",
    "CREATE TABLE t AS SELECT 1",
    "SET lock_configuration = false",
]


@pytest.mark.browser
def test_hostile_queries_are_refused(server, tmp_path):
    out = server.store / "written.csv"
    first = dom(f"{server.url}sql?{urlencode({'q': HOSTILE[0].format(out=out)})}", tmp_path)
    assert 'id="sql-error">Refused: only read-only SELECT queries are allowed, not a COPY statement' in first
    for q in HOSTILE:
        status, body = fetch(f"{server.url}sql?{urlencode({'q': q.format(out=out)})}")
        assert status == 400 and 'id="sql-error">Refused: ' in body, (q, status)
    assert not out.exists()
    status, body = fetch(f"{server.url}sql?{urlencode({'q': 'SELECT count(*) AS n FROM tokens'})}")
    assert status == 200 and 'data-rows="1"' in body  # the connection still answers


@pytest.mark.parametrize("path", ["", "sql?q=SELECT%201", f"model/{MODEL}/unit/L1H2", "report/", "nothing"])
def test_only_get_and_head_succeed(server, path):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, _ = fetch(server.url + path, method)
        assert status in (404, 405) and not 200 <= status < 300, (method, path, status)
    if path in ("", "sql?q=SELECT%201"):
        assert fetch(server.url + path, "HEAD")[0] == 200


@pytest.mark.parametrize("label,params,line", [
    ("L1H0+L1H1", {}, f"L1H0+L1H1 is not stored for tiny-gpt2 (resample draw 0); stored units: {STORED}"),
    ("MLP9", {}, f"MLP9 is out of range; the model has layers 0..1; stored units of tiny-gpt2: {STORED}"),
    ("L1H2", {"sample": 5}, "resample draw 5 was not ingested; stored draws: 0, 1"),
    ("ATTN0", {"given": "L0H1"}, "ATTN0 given L0H1 is not stored for tiny-gpt2 (resample draw 0); stored under "
                                 "L0H1: heads L0H0,L0H2,L0H3,L1 (7), group bk=L1H0+L1H3, ATTN1, MLP0..1, BLOCK1"),
])
def test_a_unit_not_stored_gets_a_page_saying_what_is(server, label, params, line):
    status, body = fetch(unit_url(server, label, **params))
    assert status == 404
    assert f'<p class="error">{line}' in body.replace("&#x27;", "'"), body[-1500:]
    assert f"<li>resample draw 0: {STORED}</li>" in body and f"<li>zero draw 0: {STORED}</li>" in body
    # The command line refuses the same with one line.
    args = ["head", label, "--store", str(server.store)] + [x for k, v in params.items() for x in (f"--{k}", str(v))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output == f"Error: {line}\n"


def test_other_bad_requests(server):
    assert fetch(f"{server.url}model/nope/unit/L1H2")[0] == 404
    assert fetch(unit_url(server, "L1H2", sample="x"))[0] == 400
    assert fetch(server.url, headers={"Host": "evil.example"})[0] == 400  # DNS rebinding: foreign host refused
    status, body = fetch(server.url + "report/../../manifest.json")
    assert status == 404


@pytest.mark.browser
def test_the_report_is_served(server, tmp_path):
    status, body = fetch(server.url + "report")  # redirected to /report/, so its relative links resolve
    assert status == 200 and "Backup-head map" in body and 'class="backup-map"' in body
    png = re.search(r'href="(figures/fig_backup_map__[^"]+\.png)"', body).group(1)
    status, _ = fetch(server.url + "report/" + png)
    assert status == 200
    page = dom(server.url + "report/", tmp_path)
    assert 'data-errors="0"' in page and 'data-loaded="1"' in page
    heads = re.findall(r'<a class="head" href="(/model/tiny-gpt2/unit/L\dH\d)">', page)
    assert len(heads) >= 4  # the heads it names link to their pages on the server
    status, body = fetch(server.url.rstrip("/") + heads[0])
    assert status == 200 and f'data-head="{heads[0].rsplit("/", 1)[1]}"' in body


# -- the same numbers everywhere -------------------------------------------------------------------
def _html_figures(page: str) -> dict:
    """The figures an HTML view shows: per section, the list of (key, text) of its numbers."""
    out = {}
    for section in ("summary", "tokens", "lens"):
        body = page.split(f'<section id="{section}"')[1].split("</section>")[0]
        out[section] = re.findall(r'<span class="num" data-key="(\w+)">([^<]*)</span>', body)
    return out


def _text_figures(text: str) -> dict:
    """The same figures read off the terminal page."""
    summary = []
    for line in text.splitlines():
        line = re.sub(r" \[[^\]]*\]", "", line)  # a figure's confidence interval, when the query gives one
        if m := re.match(r"(?:clean DE|DE given \w+) (\S+), ablated DE (\S+), logit change (\S+)$", line):
            summary += list(zip(("de_clean", "de_ablated", "d_logit"), m.groups()))
        if m := re.match(r"self-repair (\S+) = heads (\S+).* \+ MLPs (\S+).* \+ LayerNorm (\S+).*ratio (\S+)$", line):
            summary += list(zip(("sr", "sr_heads", "sr_mlps", "sr_ln", "ln_ratio"), m.groups()))
    tokens = [kv for m in re.finditer(r"^  DE +(\S+)  Δlogit +(\S+)  sr +(\S+)  …", text, re.M)
              for kv in zip(("de_clean", "d_logit", "sr"), m.groups())]
    lens = [("lens", v) for line in text.splitlines() if line.startswith(("  promoted:", "  suppressed:"))
            for v in re.findall(r" (-?[0-9][0-9.]*(?:e[-+][0-9]+)?)(?:,|$)", line)]
    return {"summary": summary, "tokens": tokens, "lens": lens}


def test_terminal_file_server_and_notebook_show_the_same_figures(server, tmp_path):
    from selfrepair.analysis.head_page import html, text
    from selfrepair.analysis.notebook import Store

    label, given = "bk", "L0H1"  # a group under a condition: every sentence of the summary
    with Store.open(server.store) as s:
        page = s.head(label, given=given, n_tokens=4)  # the notebook API: the page's one data function
    params = {"tokens": 4, "given": given}
    status, served = fetch(unit_url(server, label, **params))
    assert status == 200
    (tmp_path / "MLP1.html").write_text("")  # a page written beside it: the file links it
    result = CliRunner().invoke(main, ["head", label, "--store", str(server.store), "--tokens", "4",
                                       "--html", str(tmp_path / "p.html"), "--given", given])
    assert result.exit_code == 0, result.output
    terminal = _text_figures(result.output)
    views = {"file": _html_figures((tmp_path / "p.html").read_text()), "server": _html_figures(served),
             "notebook": _html_figures(page._repr_html_()), "html()": _html_figures(html(page))}
    assert terminal == _text_figures(text(page))
    want_summary = [(k, number(page.summary[k])) for k, _ in terminal["summary"]]
    assert terminal["summary"] == want_summary and len(want_summary) == 8
    assert [kv for kv in views["file"]["summary"] if kv[0].startswith(("alone_", "growth_"))] == [
        ("alone_d_logit", number(page.alone["d_logit"])), ("alone_sr", number(page.alone["sr"])),
        ("growth_d_logit", number(page.summary["d_logit"] - page.alone["d_logit"]))]
    for name, figures in views.items():
        assert [kv for kv in figures["summary"] if kv[0] in dict(want_summary)] == want_summary, name
        assert figures["tokens"] == terminal["tokens"], name
        assert [v for _, v in figures["lens"]] == [v for _, v in terminal["lens"]], name
    assert len(terminal["tokens"]) == 12 and len(terminal["lens"]) == 20
    # The notebook shows the server's page itself: the same fragment, but for the links only a server has.
    served_fragment = re.search(r'<div class="srpage".*</div>', served, re.S).group(0)
    unlinked = re.sub(r'<a class="unit" href="[^"]*">([^<]*)</a>', r'<span class="unit">\1</span>', served_fragment)
    assert unlinked == page._repr_html_() and served_fragment != unlinked
    assert '<a class="unit" href="MLP1.html">MLP1</a>' in (tmp_path / "p.html").read_text()
    # Confidence intervals, where a query gives `<key>_ci_low/_ci_high`, show beside their figure in every view.
    ci = replace(page, summary=page.summary | {"sr_ci_low": -0.5, "sr_ci_high": 0.25})
    assert f"self-repair {number(page.summary['sr'])} [-0.500, 0.250] = heads " in text(ci)
    assert (f'<span class="num" data-key="sr">{number(page.summary["sr"])}</span> '
            '<span class="ci" data-key="sr">[-0.500, 0.250]</span>') in ci._repr_html_()


# -- the command line's bad input --------------------------------------------------------------------
def test_serve_refuses_a_port_in_use_and_warns_before_exposing(unit_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--store", str(unit_store), "--port", str(port)])
        assert result.exit_code == 1
        assert result.output == f"Error: cannot listen on 127.0.0.1:{port}: the port is in use\n"
        result = CliRunner().invoke(main, ["serve", "--store", str(unit_store), "--port", str(port), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert result.output == ("Warning: --host 0.0.0.0 exposes the store to the network: anyone who can reach this "
                             "machine can read it (read-only).\n"
                             f"Error: cannot listen on 0.0.0.0:{port}: the port is in use\n")


def test_serve_refuses_a_missing_or_unreadable_store(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "bad" / "m" / "manifest.json").mkdir(parents=True)
    for store, line in [
        (tmp_path / "nope", f"no selfrepair store at {tmp_path / 'nope'}: it does not exist"),
        (tmp_path / "file", f"no selfrepair store at {tmp_path / 'file'} (no model folder with a manifest.json)"),
        (tmp_path / "bad",
         f"the manifest {tmp_path / 'bad/m/manifest.json'} is not a regular file (a folder); remove it"),
    ]:
        result = CliRunner().invoke(main, ["serve", "--store", str(store), "--port", "0"])
        assert result.exit_code == 1 and result.output == f"Error: {line}\n", result.output


# Last in the module: after every request above, the store is as it was.
def test_the_store_is_byte_identical_after_every_request(server):
    assert _snapshot(server.store) == server.before
