"""The rendered book in a real browser: headless Chromium (Debian's) driven by Playwright.

What a reader gets: every page of the toc loads without console errors, uncaught exceptions or failed
requests, asks nothing from outside the book (it is read offline), shows its images, typesets its math,
shows the notebook cells with their outputs and DataFrames as tables, and no warnings printed by the build
machine; wide tables and equations scroll inside a box of their own with a visible hint, on a desktop and on a
390-pixel phone, instead of being cut off or widening the page; the sidebar reaches every chapter, on a phone
too; internal links and anchors resolve. Screenshots land in ``_build/screenshots/``.

The book: ``TRUSTMAE_BOOK_HTML=<_build/html>`` tests a built book (``make book``); without it a smoke book is
built into a scratch folder first (every chapter under the ``smoke`` profile; see ``tests/book_build.py``).
Without Chromium the module is skipped, except under ``CI``, where that is an error.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import warnings
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from book_build import REPO, Book, build_smoke_book, given_book, notebook_warnings, serve, toc_docnames

pytestmark = pytest.mark.browser

#: Pages photographed on a desktop screen (1280 x 900); add results chapters here as they land.
SCREENSHOT_PAGES = [
    "book/intro",
    "book/01_data_and_noise",
    "book/10_evaluation",
    "book/11_noise_robustness",
    "book/13_results_vs_paper",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = REPO / "_build" / "screenshots"
#: Chromium's switches: no GPU, no sandbox (root), none of its own network traffic (this machine has none).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
TOC = toc_docnames()
ROOT_PAGE = TOC[0]


def _find_chromium() -> str | None:
    """``TRUSTMAE_CHROMIUM`` if set, else Debian's Chromium (``/usr/bin/chromium`` or on PATH)."""
    if os.environ.get("TRUSTMAE_CHROMIUM"):
        return os.environ["TRUSTMAE_CHROMIUM"] if Path(os.environ["TRUSTMAE_CHROMIUM"]).is_file() else None
    candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


CHROMIUM = _find_chromium()
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

_MISSING = (
    "Debian's Chromium is not installed (apt-get install chromium)"
    if CHROMIUM is None
    else "playwright is not installed (pip install -e '.[dev]')"
    if sync_playwright is None
    else None
)
if _MISSING and not os.environ.get("CI"):
    pytest.skip(f"browser tests need headless Chromium: {_MISSING}", allow_module_level=True)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def book(tmp_path_factory: pytest.TempPathFactory) -> Book:
    """The HTML book under test: ``TRUSTMAE_BOOK_HTML`` or a smoke build in a scratch folder."""
    if _MISSING:
        pytest.fail(f"CI is set and the browser tests cannot run: {_MISSING}", pytrace=False)
    given = os.environ.get("TRUSTMAE_BOOK_HTML")
    if given:
        return given_book(Path(given).resolve())
    try:
        built = build_smoke_book(tmp_path_factory.mktemp("smoke-book"))
    except RuntimeError as err:
        pytest.fail(f"the smoke book did not build: {err}", pytrace=False)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    report = {k: getattr(built, k) for k in ("timings", "missing", "warnings")}
    (SCREENSHOTS / "smoke-build.json").write_text(json.dumps(report, indent=2) + "\n")
    for line in built.warnings:
        warnings.warn(f"Sphinx: {line}", UserWarning, stacklevel=1)
    return built


@pytest.fixture(scope="session")
def site(book: Book):
    """Base URL (``http://127.0.0.1:<port>/``) of the book served from loopback."""
    with serve(book.html) as url:
        yield url


@pytest.fixture(scope="session")
def browser(book: Book):
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _context(browser, site: str, **options):
    """A fresh browser context (empty storage, as a first-time reader) that refuses every off-site request."""
    context = browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)
    context.site, context.off_site = site, []

    def route(r):
        if r.request.url.startswith(site) or not r.request.url.startswith(("http:", "https:", "ws:", "wss:")):
            r.continue_()
        else:
            context.off_site.append(r.request.url)
            r.abort("blockedbyclient")

    context.route("**/*", route)
    return context


_PAGE_FACTS = """async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  const outputs = Array.from(document.querySelectorAll('div.cell_output'));
  return {
    images: imgs.map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})),
    math: document.querySelectorAll('.math').length,
    untypeset: Array.from(document.querySelectorAll('.math'))
        .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
    mjxErrors: Array.from(document.querySelectorAll('mjx-merror'))
        .map(e => e.getAttribute('data-mjx-error') || e.textContent),
    cells: document.querySelectorAll('div.cell').length,
    cellOutputs: outputs.length,
    errorOutputs: document.querySelectorAll('div.cell_output :is(.output.traceback, .output.error)').length,
    tables: outputs.flatMap(o => Array.from(o.querySelectorAll('table'))).map(t => ({
        rows: t.querySelectorAll('tbody tr').length, visible: t.offsetHeight > 0 && t.offsetWidth > 0})),
    nav: Array.from(document.querySelectorAll('nav.bd-docs-nav a.reference.internal')).map(a => a.href),
    h1: (document.querySelector('h1') || {}).textContent || '',
  };
}"""

#: Tables and typeset formulas of the article that a reader cannot see whole: each must fit the page, or scroll inside a
#: box of its own (``overflow-x: auto|scroll``) that shows the scroll hint of ``book/_static/trustmae.js`` (class
#: ``tm-scrolls``) and is itself reachable the same way (a formula in a table cell: the table's box); cut off by an
#: ``overflow: hidden`` ancestor, or running off the page, is a problem, as is a page wider than the viewport.
#: Folded-away outputs (zero size) are skipped.
_WIDE_CONTENT = """() => {
  const vw = document.documentElement.clientWidth;
  const rect = (e) => e.getBoundingClientRect();
  const beyond = (r, b) => r.right > b.right + 1 || r.left < b.left - 1;
  const what = (el) => { const r = rect(el); return `<${el.tagName.toLowerCase()}> at x ${Math.round(r.left)}..${
      Math.round(r.right)} "${(el.closest('.math') || el).textContent.trim().replace(/\\s+/g, ' ').slice(0, 60)}"`; };
  const problems = [];
  let scrolling = 0;
  const reachable = (el, label) => {  // can a reader see all of el, scrolling where needed?
    const r = rect(el);
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const overflow = getComputedStyle(a).overflowX;
      if (overflow === 'auto' || overflow === 'scroll') {
        if (beyond(r, rect(a)) && a.scrollWidth > a.clientWidth + 1) {
          scrolling += 1;
          if (!a.classList.contains('tm-scrolls')) { problems.push(`${label} scrolls without a scroll hint`); return; }
        }
        return reachable(a, label);  // the box itself must be reachable
      }
      if ((overflow === 'hidden' || overflow === 'clip') && beyond(r, rect(a))) {
        problems.push(`${label} is cut off by <${a.tagName.toLowerCase()} class="${a.className}">`);
        return;
      }
    }
    if (r.right > vw + 1 || r.left < -1) problems.push(`${label} runs off the page`);
  };
  for (const el of document.querySelectorAll('.bd-article table, .bd-article .math mjx-math')) {
    const r = rect(el);
    if (r.width > 0 && r.height > 0) reachable(el, what(el));
  }
  const page = document.documentElement.scrollWidth;
  if (page > vw + 1) problems.push(`the page is ${page} px wide in a ${vw} px viewport`);
  return {problems, scrolling};
}"""

_MATHJAX_READY = """async () => {
  const mj = window.MathJax;
  if (!mj || !mj.startup || !mj.startup.promise) return null;
  await mj.startup.promise;
  return mj.version;
}"""


def _open(context, url: str):
    """Open ``url`` in a new page of ``context`` and wait for MathJax; returns (page, what went wrong)."""
    page = context.new_page()
    problems: dict = {"console": [], "pageerror": [], "failed": [], "http": []}
    first_off_site = len(context.off_site)

    def on_console(message) -> None:
        where = message.location.get("url", "")
        # Chromium asks every host for /favicon.ico by itself (the book links none); refused off-site
        # requests are reported by test_page_needs_no_other_host.
        off_site = where.startswith(("http:", "https:")) and not where.startswith(context.site)
        if message.type == "error" and not where.endswith("/favicon.ico") and not off_site:
            problems["console"].append(f"{message.text} ({where})")

    def on_response(response) -> None:
        if response.status >= 400:
            problems["http"].append(f"{response.status} {response.url}")

    page.on("console", on_console)
    page.on("response", on_response)
    page.on("pageerror", lambda err: problems["pageerror"].append(str(err)))
    page.on("requestfailed", lambda req: problems["failed"].append(f"{req.url}: {req.failure}"))
    page.goto(url, wait_until="load")
    problems["mathjax"] = page.evaluate(_MATHJAX_READY)
    page.wait_for_load_state("networkidle")  # MathJax fetches its fonts after typesetting
    problems["off_site"] = context.off_site[first_off_site:]
    return page, problems


@pytest.fixture(scope="session")
def visits(book: Book, site: str, browser):
    """Every page opened once on a desktop screen: ``visits(docname)`` -> facts and problems (cached)."""
    context = _context(browser, site, viewport=DESKTOP)
    cache_: dict[str, dict] = {}

    def visit(docname: str) -> dict:
        if docname not in cache_:
            if not book.page(docname).is_file():
                pytest.fail(f"{docname} is in the toc but the book has no {docname}.html", pytrace=False)
            page, problems = _open(context, urljoin(site, f"{docname}.html"))
            facts = page.evaluate(_PAGE_FACTS)
            facts["wide"] = page.evaluate(_WIDE_CONTENT)
            page.close()
            cache_[docname] = {**facts, **problems}
        return cache_[docname]

    yield visit
    context.close()


@pytest.fixture(scope="session")
def phone_visits(book: Book, site: str, browser):
    """Every page opened once on a 390-pixel phone: ``phone_visits(docname)`` -> the wide-content check (cached)."""
    context = _context(browser, site, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    cache_: dict[str, dict] = {}

    def visit(docname: str) -> dict:
        if docname not in cache_:
            page, _ = _open(context, urljoin(site, f"{docname}.html"))
            cache_[docname] = page.evaluate(_WIDE_CONTENT)
            if cache_[docname]["scrolling"] and docname in SCREENSHOT_PAGES:
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / f"phone-{docname.rsplit('/', 1)[-1]}.png"))
            page.close()
        return cache_[docname]

    yield visit
    context.close()


def _need(book: Book, docname: str) -> None:
    """Skip a page that a smoke build left out because its chapter does not exist yet."""
    if docname in book.missing:
        pytest.skip(f"{docname}: {book.missing[docname]}")


def _is_notebook(book: Book, docname: str) -> bool:
    return (book.html / "_sources" / f"{docname}.ipynb").is_file() or bool(re.search(r"/\d\d_", docname))


#: Cell tags under which myst-nb does not show a cell's outputs on the page (or folds them away).
UNSHOWN = {"remove-cell", "remove-output", "remove_cell", "remove_output", "hide-cell", "hide-output"}


def _html_tables_in_notebook(book: Book, docname: str) -> int | None:
    """Number of shown ``text/html`` outputs with a ``<table>`` (DataFrames) in the page's executed notebook.

    Outputs of cells tagged :data:`UNSHOWN` and ``myst_nb.glue`` outputs (shown where pasted) do not count.
    """
    src = book.html / "_sources" / f"{docname}.ipynb"
    if not src.is_file():
        return None
    cells = json.loads(src.read_text())["cells"]
    shown = [c for c in cells if not UNSHOWN & set(c.get("metadata", {}).get("tags", []))]
    outputs = [o for c in shown for o in c.get("outputs", []) if "scrapbook" not in o.get("metadata", {})]
    return sum("<table" in "".join(o.get("data", {}).get("text/html", "")) for o in outputs)


# ---------------------------------------------------------------------------------------- every page


@pytest.mark.parametrize("docname", TOC)
def test_page_loads_cleanly(book: Book, visits, site: str, docname: str) -> None:
    _need(book, docname)
    facts = visits(docname)
    problems = [f"uncaught exception: {e}" for e in facts["pageerror"]]
    problems += [f"console error: {e}" for e in facts["console"]]
    problems += [f"HTTP {e}" for e in facts["http"]]
    # Off-site requests fail here by design; test_page_needs_no_other_host reports them.
    problems += [f"failed request: {e}" for e in facts["failed"] if e.startswith(site)]
    problems += [] if facts["h1"].strip() else ["no title (h1)"]
    assert not problems, f"{docname}:\n" + "\n".join(problems)


@pytest.mark.parametrize("docname", TOC)
def test_page_needs_no_other_host(book: Book, visits, docname: str) -> None:
    """The book is read offline too: no page asks another host for anything (scripts, fonts, MathJax, ...)."""
    _need(book, docname)
    off_site = visits(docname)["off_site"]
    assert not off_site, f"{docname} requests files from other hosts (offline they fail): {off_site}"


@pytest.mark.parametrize("docname", TOC)
def test_images_load(book: Book, visits, docname: str) -> None:
    _need(book, docname)
    broken = [img["src"] for img in visits(docname)["images"] if img["width"] == 0]
    assert not broken, f"images that did not load on {docname}: {broken}"


@pytest.mark.parametrize("docname", TOC)
def test_math_is_typeset(book: Book, visits, docname: str) -> None:
    _need(book, docname)
    facts = visits(docname)
    if facts["math"] == 0:
        pytest.skip(f"{docname} has no math")
    assert facts["mathjax"], f"MathJax did not load on {docname}, so its {facts['math']} formulas show as TeX"
    assert not facts["untypeset"], f"formulas left as TeX on {docname}: {facts['untypeset'][:5]}"
    assert not facts["mjxErrors"], f"TeX errors on {docname}: {facts['mjxErrors']}"


@pytest.mark.parametrize("docname", TOC)
def test_notebook_cells_and_outputs_render(book: Book, visits, docname: str) -> None:
    _need(book, docname)
    if not _is_notebook(book, docname):
        pytest.skip(f"{docname} is a prose page")
    facts = visits(docname)
    assert facts["cells"] > 0, f"no code cells on {docname}"
    assert facts["cellOutputs"] > 0, f"no cell outputs on {docname}: was the notebook executed?"
    assert facts["errorOutputs"] == 0, f"{docname} shows {facts['errorOutputs']} error outputs"


@pytest.mark.parametrize("docname", TOC)
def test_dataframes_render_as_tables(book: Book, visits, docname: str) -> None:
    _need(book, docname)
    expected = _html_tables_in_notebook(book, docname)
    if not expected:
        pytest.skip(f"{docname} shows no DataFrame" if expected == 0 else f"no notebook source of {docname}")
    tables = visits(docname)["tables"]
    shown = [t for t in tables if t["rows"] > 0 and t["visible"]]
    assert len(shown) >= expected, f"{docname}: {expected} DataFrames, {len(shown)} visible tables ({tables})"


@pytest.mark.parametrize("docname", TOC)
def test_notebook_outputs_show_no_warnings(book: Book, docname: str) -> None:
    """No warning of the build machine reaches the page (e.g. a ``TqdmWarning`` with its site-packages path)."""
    _need(book, docname)
    executed = book.html / "_sources" / f"{docname}.ipynb"
    if not executed.is_file():
        pytest.skip(f"{docname} is a prose page")
    found = notebook_warnings(executed)
    assert not found, f"{docname} shows warnings in its outputs:\n" + "\n".join(found)


@pytest.mark.parametrize("docname", TOC)
def test_wide_content_scrolls_in_its_own_box(book: Book, visits, docname: str) -> None:
    """Desktop: no table or equation is cut off; a wide one scrolls in its box, with the scroll hint."""
    _need(book, docname)
    problems = visits(docname)["wide"]["problems"]
    assert not problems, f"{docname} on a desktop:\n" + "\n".join(problems)


@pytest.mark.parametrize("docname", TOC)
def test_wide_content_scrolls_in_its_own_box_on_a_phone(book: Book, phone_visits, docname: str) -> None:
    """390-pixel phone: tables and equations wider than the screen scroll inside a box that fits the screen and
    shows that it scrolls; nothing is cut off and the page itself never scrolls sideways."""
    _need(book, docname)
    problems = phone_visits(docname)["problems"]
    assert not problems, f"{docname} on a {PHONE['width']} px phone:\n" + "\n".join(problems)


# -------------------------------------------------------------------------------------- navigation


def test_index_leads_to_the_front_page(book: Book, browser, site: str) -> None:
    context = _context(browser, site, viewport=DESKTOP)
    page = context.new_page()
    page.goto(site)
    page.wait_for_url(urljoin(site, f"{ROOT_PAGE}.html"))  # index.html is a redirect
    context.close()


def _docname_of(url: str, site: str, current: str) -> str | None:
    """``http://host/book/x.html#a`` -> ``book/x``; ``#a`` on the current page -> ``current``."""
    if not url.startswith(site):
        return None
    path = urlsplit(url).path[len(urlsplit(site).path) :]
    return re.sub(r"\.html$", "", path) if path else current


def test_sidebar_links_every_chapter(book: Book, visits, site: str) -> None:
    linked = {_docname_of(href, site, ROOT_PAGE) for href in visits(ROOT_PAGE)["nav"]}
    unlinked = [name for name in book.built if name not in linked]
    assert not unlinked, f"toc pages missing from the front page's sidebar: {unlinked}"


def test_desktop_screenshots(book: Book, browser, site: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = _context(browser, site, viewport=DESKTOP)
    for docname in SCREENSHOT_PAGES:
        if docname not in book.built:
            continue
        page, _ = _open(context, urljoin(site, f"{docname}.html"))
        out = SCREENSHOTS / f"desktop-{docname.rsplit('/', 1)[-1]}.png"
        page.screenshot(path=str(out))
        assert out.stat().st_size > 10_000, f"{out} looks blank"
        page.close()
    context.close()


def test_desktop_sidebar_toggle_folds_the_sidebar(book: Book, browser, site: str) -> None:
    """The article header's "Toggle primary sidebar" button hides the chapter list and brings it back."""
    context = _context(browser, site, viewport=DESKTOP)
    page, _ = _open(context, urljoin(site, f"{ROOT_PAGE}.html"))
    first_link = page.locator("nav.bd-docs-nav a.reference.internal").first
    expect(first_link).to_be_visible()
    toggle = page.locator("button.primary-toggle:visible").first
    toggle.click()
    expect(first_link).to_be_hidden()
    toggle.click()
    expect(first_link).to_be_visible()
    context.close()


def test_phone_navigation(book: Book, browser, site: str) -> None:
    """On a phone the sidebar is folded away; the header's toggle opens it, every chapter one tap away."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = _context(browser, site, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    page, problems = _open(context, urljoin(site, f"{ROOT_PAGE}.html"))
    assert not problems["pageerror"], problems["pageerror"]
    nav_links = page.locator("nav.bd-docs-nav a.reference.internal")
    assert nav_links.count() >= len(book.built)
    assert not any(link.is_visible() for link in nav_links.all()), "the sidebar should be folded on a phone"
    page.screenshot(path=str(SCREENSHOTS / "phone-intro.png"))

    toggle = page.locator("button.primary-toggle:visible").first
    expect(toggle).to_be_visible()
    toggle.click()
    for link in nav_links.all():
        expect(link).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "phone-intro-nav.png"))

    # A tap on the last chapter's link opens it.
    last = book.built[-1]
    href = posixpath.relpath(last, posixpath.dirname(ROOT_PAGE)) + ".html"
    link = page.locator(f'nav.bd-docs-nav a.reference.internal[href="{href}"]')
    link.first.click()
    page.wait_for_url(urljoin(site, f"{last}.html"))
    context.close()


# --------------------------------------------------------------------------------------------- links


class _Links(HTMLParser):
    """The ids of an HTML file and its references: ``a``/``link`` ``href``, ``img``/``script`` ``src``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id",) + (("name",) if tag == "a" else ()):
            if a.get(key):
                self.ids.add(a[key])
        attr = {"a": "href", "link": "href", "img": "src", "script": "src"}.get(tag)
        if attr and a.get(attr) is not None:
            self.refs.append((tag, a[attr]))


@cache
def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _bad_links(html_root: Path, page: Path) -> list[str]:
    bad = []
    for tag, ref in _parse(page).refs:
        parts = urlsplit(ref.strip())
        if parts.scheme:
            ok = (parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in ref) or (
                parts.scheme == "mailto" and "@" in parts.path
            )
            ok = ok or (tag in ("img", "a") and parts.scheme == "data")  # inline images, CSV downloads
            if not ok:
                bad.append(f"malformed external link <{tag}> {ref!r}")
            continue
        if parts.netloc:
            bad.append(f"protocol-relative link <{tag}> {ref!r}")
            continue
        target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if target.is_dir():
            target = target / "index.html"
        if not target.is_relative_to(html_root.resolve()):
            bad.append(f"<{tag}> {ref!r} points outside the book")
        elif not target.is_file():
            bad.append(f"<{tag}> {ref!r}: no file {target.relative_to(html_root.resolve())}")
        elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _parse(target).ids:
            bad.append(f"<{tag}> {ref!r}: no id {parts.fragment!r} in {target.name}")
    return bad


@pytest.mark.parametrize("docname", TOC)
def test_links_resolve(book: Book, docname: str) -> None:
    _need(book, docname)
    bad = _bad_links(book.html, book.page(docname))
    assert not bad, f"broken links on {docname}:\n" + "\n".join(bad)


def test_links_resolve_on_other_pages(book: Book) -> None:
    """Index, search, general index: every HTML file outside the toc pages."""
    pages = {book.page(name).resolve() for name in book.built}
    others = [p for p in sorted(book.html.rglob("*.html")) if p.resolve() not in pages and "_static" not in p.parts]
    bad = [f"{p.relative_to(book.html)}: {b}" for p in others for b in _bad_links(book.html, p)]
    assert not bad, "broken links:\n" + "\n".join(bad)
