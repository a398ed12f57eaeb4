"""`selfrepair serve`: a local, read-only web app over a store (Starlette on uvicorn).

Pages: an index of models and their stored units (`/`), each unit's page (`/model/M/unit/LABEL`, the
same page `selfrepair head --html` writes, from the same data function), the report (`/report`, built
on first request into a private folder outside the store) and a SQL box (`/sql?q=…`) that runs through
`Store.sql`, the sandbox `selfrepair sql` uses.

Nothing writes: every route takes GET (and HEAD) only, so any other method gets 405; the store is
opened read-only and DuckDB's own sandbox forbids writing files. Requests for a host other than the
one served are refused (DNS rebinding), and pages forbid loading anything from elsewhere (CSP).
"""

from __future__ import annotations

import contextlib
import html as _html
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from selfrepair.analysis import page_html
from selfrepair.analysis.head_page import build_head_page, fragment
from selfrepair.analysis.units import KIND_WORDS, StoredUnits, info_lines
from selfrepair.errors import ConfigError, QueryError, SelfRepairError, StoreError, StoreNotFound
from selfrepair.queries.output import format_value
from selfrepair.analysis.notebook import Store

e = _html.escape
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SQL_ROWS = 1000  # rows a SQL answer shows; it says when it cut
SQL_SECONDS = 60.0  # a SQL box query is interrupted after this long (the server serves one query at a time)
HEADERS = {
    # Nothing loads from anywhere else: the pages carry their style and script inline.
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                               "script-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }
nav { border-bottom: 1px solid #ccc; padding-bottom: 0.4em; margin-bottom: 1em; }
nav a { margin-right: 1em; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
table.data { border-collapse: collapse; font-size: 0.85em; }
table.data td, table.data th { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.error { color: #a94442; background: #f2dede; padding: 0.5em; }
.units a { font-family: monospace; margin-right: 0.6em; }
textarea { width: 100%; font-family: monospace; }
"""
NAV = '<nav><a href="/">Index</a><a href="/report/">Report</a><a href="/sql">SQL</a></nav>'


@dataclass(frozen=True)
class ServeConfig:
    """What `selfrepair serve` serves and where.

    Args:
        store: the store root.
        host: the address to listen on (127.0.0.1: this machine only).
        port: the port (0: any free one, printed at start).
        report_figures: the report's figures (None: all of them).
    """

    store: Path
    host: str = "127.0.0.1"
    port: int = 8000

    report_figures: tuple[str, ...] | None = None

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is outside 0..65535")

    @property
    def exposed(self) -> bool:
        """Whether the server listens beyond this machine."""
        return self.host not in LOOPBACK


class ServerLinks(page_html.Links):
    """Each unit's page on this server, in the page's model and draw."""

    def unit(self, page, label, given=None):
        params = {"ablation": page.ablation, "sample": page.sample, "p": f"{page.p:g}"}
        if given:
            params["given"] = given
        return unit_url(page.model, label, params)


def unit_url(model: str, label: str, params: dict | None = None) -> str:
    query = f"?{urlencode(params)}" if params else ""
    return f"/model/{quote(model, safe='')}/unit/{quote(label, safe='')}{query}"


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
                        f"<style>{STYLE}</style></head><body>{NAV}{body}</body></html>\n", status, headers=HEADERS)


def _error(title: str, message: str, status: int, extra: str = "") -> HTMLResponse:
    return _page(title, f"<h1>{e(title)}</h1><p class=\"error\">{e(message)}</p>{extra}", status)


class Browser:
    """The app's state: the open store (one query at a time), the report once built."""

    def __init__(self, store, report_figures: tuple[str, ...] | None = None):
        self.store = store
        self.lock = threading.Lock()  # one DuckDB connection: requests take turns
        self.report_figures = report_figures
        self.report_dir: Path | None = None
        self._temp = Path(tempfile.mkdtemp(prefix="selfrepair-serve-"))

    def close(self) -> None:
        shutil.rmtree(self._temp, ignore_errors=True)

    # -- pages --------------------------------------------------------------------------------
    def index(self, request: Request) -> Response:
        parts = [f"<h1>selfrepair store</h1><p><code>{e(str(self.store.root))}</code></p>"]
        with self.lock:
            for inv in self.store.inventories:
                stored = StoredUnits.of(self.store, inv.model)
                parts.append(f'<section class="model" id="{e(inv.model)}"><h2>{e(inv.model)}</h2>'
                             f"<pre>{e(chr(10).join(info_lines(inv, stored)))}</pre>{self._unit_links(inv, stored)}"
                             "</section>")
        parts.append('<p><a href="/report/">The report</a> (figures and tables, built on first visit) · '
                     '<a href="/sql">SQL</a> over every table and view.</p>')
        return _page("selfrepair store", "".join(parts))

    def _unit_links(self, inv, stored: StoredUnits) -> str:
        """Every stored unit of each draw (and under each condition), by kind, linked to its page."""
        out = []
        for d in inv.draws:
            params = {"ablation": d.ablation, "sample": d.sample}
            for cond in [None, *stored.conditions(d.ablation, d.sample)]:
                label = cond.label if cond is not None else ""
                units = stored.draw_units(d.ablation, d.sample, label)
                if not units:
                    continue
                extra = {"given": label} if label else {}
                rows = []
                for kind, (_, plural) in KIND_WORDS.items():
                    links = [f'<a href="{e(unit_url(inv.model, u.label, params | extra))}">{e(u.label)}</a>'
                             for u in units if u.kind == kind]
                    if links:
                        rows.append(f"<tr><th>{e(plural)}</th><td class=\"units\">{''.join(links)}</td></tr>")
                where = f"{d.ablation} draw {d.sample}" + (f", given {label}" if label else "")
                out.append(f"<h3>{e(where)}</h3><table>{''.join(rows)}</table>")
        return "".join(out) or "<p>No ablation stored yet.</p>"

    def unit(self, request: Request) -> Response:
        model, label = request.path_params["model"], request.path_params["label"]
        q = request.query_params
        try:
            sample = int(q.get("sample", "0"))
            p = float(q["p"]) if q.get("p") else None
            tokens = int(q.get("tokens", "10"))
        except ValueError as err:
            return _error("Bad request", f"sample, p and tokens must be numbers ({err})", 400)
        if not 1 <= tokens <= 200:
            return _error("Bad request", f"tokens must be in 1..200, got {tokens}", 400)
        with self.lock:
            if model not in self.store.models:
                return _error("Not stored", f"model {model!r} is not in this store; models: "
                                            f"{', '.join(self.store.models)}", 404, '<p><a href="/">The index</a></p>')
            try:
                page = build_head_page(self.store, label, model=model, ablation=q.get("ablation") or None, p=p,
                                       sample=sample, n_tokens=tokens, given=q.get("given") or None)
            except (QueryError, ConfigError) as err:
                # The refusal's own line (`selfrepair head` prints the same), then every stored unit.
                stored = StoredUnits.of(self.store, model)
                lines = [f"{d.ablation} draw {d.sample}: {stored.summary(stored.draw_units(d.ablation, d.sample))}"
                         for d in next(i for i in self.store.inventories if i.model == model).draws]
                listing = "".join(f"<li>{e(line)}</li>" for line in lines)
                return _error("Not stored", str(err), 404,
                              f'<p id="stored">Stored units of {e(model)}:</p><ul>{listing}</ul>'
                              f'<p><a href="/#{e(model)}">The index of {e(model)}</a></p>')
        return HTMLResponse(page_html.document(page, fragment(page, ServerLinks()), NAV), headers=HEADERS)

    def sql(self, request: Request) -> Response:
        text = request.query_params.get("q", "")
        form = ('<h1>SQL</h1><p>One read-only SELECT over every table and view (the sandbox of '
                '<code>selfrepair sql</code>); at most ' f"{SQL_ROWS:,} rows shown.</p>"
                f'<form method="get" action="/sql"><textarea name="q" rows="6">{e(text)}</textarea>'
                '<p><button type="submit">Run</button></p></form>')
        if not text.strip():
            return _page("SQL", form)
        with self.lock:
            timer = threading.Timer(SQL_SECONDS, self.store.interrupt)
            timer.start()
            try:
                df, more = self.store.sql_head(text, max_rows=SQL_ROWS)
            except SelfRepairError as err:
                return _page("SQL", form + f'<p class="error" id="sql-error">Refused: {e(str(err))}</p>', 400)
            finally:
                timer.cancel()
        cut = f" (the first {SQL_ROWS:,}; the query has more)" if more else ""
        return _page("SQL", form + f'<p id="sql-rows" data-rows="{df.height}">{df.height} rows{cut}</p>'
                     + sql_table(df))

    def report(self, request: Request) -> Response:
        path = request.path_params.get("path") or "report.html"  # the report's files link relative to /report/
        with self.lock:
            if self.report_dir is None:
                from selfrepair.analysis.report import build_report  # matplotlib: only when a report is asked

                try:
                    # The heads the report names link to this server's pages (same defaults: resample, top_p).
                    built = build_report(self.store, self._temp / "report",
                                         figures=list(self.report_figures) if self.report_figures else None,
                                         head_links=unit_url)
                except SelfRepairError as err:
                    return _error("No report", str(err), 500)
                self.report_dir = built.path.parent
        target = (self.report_dir / path).resolve()
        if not target.is_relative_to(self.report_dir.resolve()) or not target.is_file():
            return _error("Not found", f"the report has no file {path!r}", 404)
        return FileResponse(target, headers=HEADERS)

    def not_found(self, request: Request, exc) -> Response:
        return _error("Not found", f"no page at {request.url.path}", getattr(exc, "status_code", 404))


def sql_table(df) -> str:
    """A SQL answer as a table, each cell as `selfrepair sql` prints it."""
    head = "".join(f"<th>{e(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(format_value(v))}</td>" for v in row) + "</tr>" for row in df.iter_rows())
    return f'<table class="data sql"><tr>{head}</tr>{body}</table>'


def create_app(store, report_figures: tuple[str, ...] | None = None, hosts: list[str] | None = None) -> Starlette:
    """The web app over an open `Store` (read-only: GET and HEAD only).

    Args:
        store: an open `selfrepair.Store`.
        report_figures: the report's figures (None: all).
        hosts: the Host headers accepted (None: the loopback names).
    """
    b = Browser(store, report_figures)
    get = ["GET", "HEAD"]
    routes = [Route("/", b.index, methods=get),
              Route("/model/{model}/unit/{label}", b.unit, methods=get),
              Route("/sql", b.sql, methods=get),
              Route("/report", lambda request: RedirectResponse("/report/", headers=HEADERS), methods=get),
              Route("/report/{path:path}", b.report, methods=get)]
    allowed = hosts or ["127.0.0.1", "localhost", "[::1]"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        b.close()  # the built report's private folder

    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)],
                    exception_handlers={404: b.not_found, 405: b.not_found}, lifespan=lifespan)
    app.state.browser = b
    return app


def bind(config: ServeConfig) -> socket.socket:
    """The listening socket, bound before the app starts, so a port in use is one line.

    Raises:
        StoreError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        why = "the port is in use" if err.errno == 98 else (err.strerror or str(err))
        raise StoreError(f"cannot listen on {config.host}:{config.port}: {why}") from None
    except (socket.gaierror, UnicodeError) as err:
        sock.close()
        raise StoreError(f"cannot listen on {config.host}:{config.port}: {err}") from None
    return sock


def open_store(path: Path):
    """Open the store for serving, every failure as a typed error naming the path."""
    if not path.exists():
        raise StoreNotFound(f"no selfrepair store at {path}: it does not exist")
    try:
        return Store.open(path)
    except OSError as err:
        raise StoreError(f"cannot read the store at {path}: {err.strerror or err}") from None


def url(config: ServeConfig, sock: socket.socket) -> str:
    host = config.host if ":" not in config.host else f"[{config.host}]"
    return f"http://{host}:{sock.getsockname()[1]}/"


def run(config: ServeConfig, sock: socket.socket, store) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    hosts = None
    if config.exposed:
        hosts = ["*"]  # exposed on purpose: any name the machine is reached by
    app = create_app(store, config.report_figures, hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])
