"""The status page at /admin/: served by the router from its package (plain HTTP checks),
and driven in a real headless Chromium (Playwright on Debian's chromium: no browser
download) against a router on a loopback socket."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from wa_router.sim import SimInstance
from wa_router.statuspage import PAGE_FILES, read_file
from wa_router.stores import Source

from .conftest import StartRouter, caller_traffic, send_body, wait_for
from .test_admin import AUTH, TOKEN, Client, admin, started

ROOT = Path(__file__).resolve().parent.parent
TOKEN_KEY = "wa-router.admin-token"  # page.js's sessionStorage key
EXPECT_TIMEOUT_MS = 10_000

# -- plain HTTP ----------------------------------------------------------------------------


def csp_directives(header: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


class _Refs(HTMLParser):
    """Every src/href of a page, and whatever would run or style inline."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "action", "formaction") and value is not None:
                self.refs.append(value)
            if name == "style" or name.startswith("on"):
                self.inline.append(f"<{tag} {name}=...>")
        if tag == "style":
            self.inline.append("<style>")
        self._in_script = tag == "script"
        if tag == "script" and not dict(attrs).get("src"):
            self.inline.append("<script> without src")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline script text")


async def test_page_is_served_with_a_strict_csp(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await started(sims, start_router)
    # No token: the files hold no data.
    resp = await client.get("/admin/")
    assert resp.status == 200
    assert resp.content_type == "text/html" and resp.charset == "utf-8"
    csp = csp_directives(resp.headers["Content-Security-Policy"])
    assert csp["default-src"] == ["'self'"]
    for directive in ("script-src", "style-src", "connect-src"):
        assert csp[directive] == ["'self'"], directive
    assert csp["img-src"] == ["'self'", "data:"]  # data: for the empty icon only
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert csp["form-action"] == ["'none'"]  # the browser never submits the token form
    sources = [s for values in csp.values() for s in values]
    assert not any(s.startswith(("http:", "https:", "*", "'unsafe")) for s in sources), sources
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    html = await resp.text()
    assert html.encode() == read_file("index.html")  # from the package's files

    refs = _Refs()
    refs.feed(html)
    assert refs.inline == []  # CSP would block it anyway: nothing inline
    assert sorted(refs.refs) == ["data:,", "page.css", "page.js"]

    for path, ctype in (("/admin/page.js", "text/javascript"), ("/admin/page.css", "text/css")):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.content_type == ctype and resp.charset == "utf-8", path
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert await resp.read() == read_file(PAGE_FILES[path][0])
    assert (await client.head("/admin/")).status == 200
    # /admin (an operator's typing) lands on the page.
    resp = await client.get("/admin", allow_redirects=False)
    assert resp.status == 308 and resp.headers["Location"] == "admin/"
    assert (await client.get("/admin")).url.path == "/admin/"
    # Nothing of it reached an instance.
    assert all(caller_traffic(s) == 0 for s in sims)


def test_page_files_reference_no_other_origin_and_insert_text_only() -> None:
    for name, _ in PAGE_FILES.values():
        text = read_file(name).decode()
        assert not re.search(r"https?://", text, re.IGNORECASE), name
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?//""", text), name
        assert "@import" not in text, name
    script = read_file("page.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "textContent" in script
    # The token lives in sessionStorage only: no cookie, no localStorage, no URL.
    assert "sessionStorage" in script
    for place in ("document.cookie", "localStorage", "location.search", "history."):
        assert place not in script, place


def test_page_files_are_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["wa_router"]
    for name, _ in PAGE_FILES.values():
        assert any(fnmatch.fnmatch(f"statuspage/{name}", p) for p in patterns), name
        assert (ROOT / "wa_router" / "statuspage" / name).is_file()


async def test_page_off_with_the_admin_api(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await started(sims, start_router, admin={})
    for path in PAGE_FILES:
        resp = await client.get(path)
        assert resp.status == 404 and (await resp.json())["error"] == "admin_off", path


async def test_status_has_what_the_page_shows(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("held")
    client, router = await started(sims, start_router)
    doc = await admin(client, "GET", "/admin/status")
    assert doc["inflight"] == 0  # the status request itself is not counted
    assert isinstance(doc["now"], float)
    assert doc["parking"]["parked"] == 0 and doc["webhooks"]["backlog"] is None
    # A request held by a stopped instance is in flight.
    sims[0].pause()
    task = asyncio.create_task(client.post("/api/messages/send", json=send_body("held")))
    try:
        await wait_for(lambda: sims[0].count("POST", "/api/messages/send") == 1, what="the send")
        assert (await admin(client, "GET", "/admin/status"))["inflight"] == 1
    finally:
        sims[0].resume()
        resp = await task
    assert resp.status == 200
    assert (await admin(client, "GET", "/admin/status"))["inflight"] == 0


# -- in a real browser ---------------------------------------------------------------------


def find_chromium() -> str | None:
    given = os.environ.get("WA_TEST_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def install_chromium() -> str:
    """Install Debian's chromium (root with apt-get only); why it could not, else ''."""
    if shutil.which("apt-get") is None:
        return "no apt-get here"
    if os.geteuid() != 0:
        return "not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "chromium"]
    for argv in (install, ["apt-get", "update", "-qq"], install):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"{' '.join(argv)} timed out"
        if done.returncode == 0 and argv is install and find_chromium():
            return ""
    return f"apt-get failed: {done.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        why = install_chromium()
        path = find_chromium()
        if path is None:
            pytest.skip(
                "no Chromium: none on PATH (chromium, chromium-browser) nor in "
                f"$WA_TEST_CHROMIUM, and `apt-get install -y chromium` failed ({why}); "
                "install Debian's chromium package or set WA_TEST_CHROMIUM to a Chromium"
            )
    return path


@dataclasses.dataclass
class Browser:
    page: Any  # playwright.async_api.Page
    context: Any  # playwright.async_api.BrowserContext
    requests: list[str]
    # Console errors and uncaught exceptions (a CSP violation is one).
    errors: list[str]

    def problems(self) -> list[str]:
        """What went wrong in the page, less the failed fetches the page expects and
        handles (a 401 for a wrong token, a 404 for a prefix that is no whole id)."""
        expected = re.compile(r"Failed to load resource: .* status of 40[14]")
        return [e for e in self.errors if not expected.search(e)]


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    # A declared test dependency (pyproject's test extra): missing it is an error, no skip.
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    async with async_playwright() as pw:
        chrome = await pw.chromium.launch(executable_path=chromium)
        context = await chrome.new_context()
        page = await context.new_page()
        page.set_default_timeout(EXPECT_TIMEOUT_MS)
        seen = Browser(page, context, [], [])
        page.on("request", lambda r: seen.requests.append(r.url))
        page.on(
            "console",
            lambda m: seen.errors.append(m.text) if m.type == "error" else None,
        )
        page.on("pageerror", lambda exc: seen.errors.append(f"uncaught: {exc}"))
        try:
            yield seen
        finally:
            await context.close()
            await chrome.close()


def base(client: Client) -> str:
    return str(client.make_url("/"))


async def sign_in(page: Any, token: str) -> None:
    await page.locator("#token").fill(token)
    await page.locator("#login-submit").click()


async def test_in_a_browser_sign_in_see_the_pool_drain_sync_and_search(
    sims: list[SimInstance], start_router: StartRouter, browser: Browser
) -> None:
    from playwright.async_api import expect

    sims[0].add_session("alpha-1")
    sims[1].add_session("alpha-2")
    sims[2].add_session("beta-1")
    client, router = await started(sims, start_router)
    # A status as an instance might report it: it must show as text, never as markup.
    evil = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    await router.directory.observe("gamma-x", "node-3", Source.ADMIN, status=evil)  # type: ignore[arg-type]
    page = browser.page
    origin = base(client)

    resp = await page.goto(origin + "admin/")
    assert resp is not None and resp.status == 200
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()

    await sign_in(page, TOKEN)
    rows = page.locator("#instances tbody tr")
    await expect(rows).to_have_count(4)
    for i in range(4):
        row = page.locator(f'#instances tr[data-instance="node-{i}"]')
        await expect(row.locator("td.name")).to_have_text(f"node-{i}")
        await expect(row.locator("td.state")).to_have_text("healthy")
        await expect(row.locator("td.drained")).to_have_text("no")
    await expect(page.locator("#ready")).to_have_text("ready")
    await expect(page.locator("#sum-sessions")).to_have_text("4")
    await expect(page.locator("#sum-parked")).to_have_text("0")
    await expect(page.locator("#sum-backlog")).to_have_text("no backlog configured")
    await expect(page.locator("#sum-inflight")).to_have_text(re.compile(r"^\d+$"))
    await expect(page.locator("#sum-sync")).to_contain_text("Summary: 3 updated")
    # The token: in this tab's sessionStorage, not in a cookie or the URL.
    assert await page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") == TOKEN
    assert await browser.context.cookies() == []
    assert TOKEN not in page.url

    # Drain node-2 from its button: the router's own state says so, then the page.
    row = page.locator('#instances tr[data-instance="node-2"]')
    await row.locator("button.drain").click()
    await wait_for(lambda: router.pool.get("node-2").draining, what="node-2 drained")  # type: ignore[union-attr]
    await expect(row.locator("td.drained")).to_have_text("draining")
    await expect(row.locator("button")).to_have_text("Undrain")
    assert not any(router.pool.get(f"node-{i}").draining for i in (0, 1, 3))  # type: ignore[union-attr]
    await row.locator("button.undrain").click()
    await wait_for(lambda: not router.pool.get("node-2").draining, what="node-2 undrained")  # type: ignore[union-attr]
    await expect(row.locator("td.drained")).to_have_text("no")

    # The page refreshes by itself: a drain made elsewhere shows without a click.
    await admin(client, "POST", "/admin/instances/node-1/drain")
    other = page.locator('#instances tr[data-instance="node-1"]')
    await expect(other.locator("td.drained")).to_have_text("draining")

    # Sync: the report's lines, and the directory fixed.
    await sims[0].move_session("alpha-1", sims[3])
    await page.locator("#sync-dry").click()
    out = page.locator("#sync-output")
    await expect(out).to_contain_text("Fixed: alpha-1 (node-0 -> node-3)")
    await expect(out).to_contain_text("(dry run)")
    assert (await router.directory.store.get("alpha-1")).instance == "node-0"  # type: ignore[union-attr]
    await page.locator("#sync").click()
    await expect(out).to_contain_text("Fixed: alpha-1 (node-0 -> node-3)")
    await expect(out).to_contain_text("Lost: gamma-x (was node-3")
    await expect(out).to_contain_text("Summary: 1 updated, 2 verified, 1 lost, 0 duplicated")
    await expect(out).not_to_contain_text("(dry run)")
    assert (await router.directory.store.get("alpha-1")).instance == "node-3"  # type: ignore[union-attr]

    # Sessions: every one at first, then by id prefix, with owner and status.
    sessions = page.locator("#sessions tbody tr")
    await expect(sessions).to_have_count(4)
    await page.locator("#search").fill("alpha")
    await page.locator("#search").press("Enter")
    await expect(sessions).to_have_count(2)
    first = page.locator('#sessions tr[data-session="alpha-1"] td')
    await expect(first).to_have_text(["alpha-1", "node-3", "connected", "sync", re.compile("ago")])
    second = page.locator('#sessions tr[data-session="alpha-2"] td')
    await expect(second.nth(1)).to_have_text("node-1")
    await expect(page.locator("#sessions-note")).to_contain_text("2 sessions")
    # A whole id.
    await page.locator("#search").fill("beta-1")
    await page.locator("#search").press("Enter")
    await expect(sessions).to_have_count(1)
    await expect(page.locator('#sessions tr[data-session="beta-1"] td').nth(1)).to_have_text(
        "node-2"
    )
    await page.locator("#search").fill("nobody")
    await page.locator("#search").press("Enter")
    await expect(sessions).to_have_count(0)
    await expect(page.locator("#sessions-note")).to_contain_text("0 sessions")
    # Markup in data stays text.
    await page.locator("#search").fill("gamma")
    await page.locator("#search").press("Enter")
    await expect(page.locator('#sessions tr[data-session="gamma-x"] td').nth(2)).to_have_text(evil)
    assert await page.locator("#sessions img, #sessions b").count() == 0
    assert await page.evaluate("window.__pwned") is None

    # A reload keeps the tab signed in; signing out forgets the token.
    await page.reload()
    await expect(rows).to_have_count(4)
    await expect(page.locator("#login")).to_be_hidden()
    await page.locator("#logout").click()
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") is None

    # Nothing asked of another origin, nothing forwarded to an instance, nothing broken.
    assert browser.requests and all(u.startswith(origin + "admin/") for u in browser.requests)
    assert not any(TOKEN in u for u in browser.requests)
    assert all(caller_traffic(s) == 0 for s in sims)
    assert browser.problems() == []


async def test_in_a_browser_sessions_page_on_and_a_prefix_is_found_past_the_first_page(
    sims: list[SimInstance], start_router: StartRouter, browser: Browser
) -> None:
    from playwright.async_api import expect

    client, router = await started(sims, start_router)
    # 1200 entries: a prefix scan reads the listing 1000 at a time (page.js's SCAN_LIMIT).
    for i in range(1200):
        await router.directory.observe(f"q{i:04d}", f"node-{i % 4}", Source.ADMIN)
    page = browser.page
    await page.goto(base(client) + "admin/")
    await sign_in(page, TOKEN)
    sessions = page.locator("#sessions tbody tr")
    more = page.locator("#more")
    await expect(sessions).to_have_count(50)  # page.js's PAGE
    await expect(page.locator("#sessions tbody tr td.name").first).to_have_text("q0000")
    await more.click()
    await expect(sessions).to_have_count(100)
    await expect(page.locator("#sessions tbody tr td.name").last).to_have_text("q0099")
    await page.locator("#search").fill("q11")
    await page.locator("#search").press("Enter")
    await expect(sessions).to_have_count(100)  # q1100..q1199: all in the second 1000
    names = page.locator("#sessions tbody tr td.name")
    await expect(names.first).to_have_text("q1100")
    await expect(names.last).to_have_text("q1199")
    await expect(more).to_be_hidden()
    await page.locator("#search").fill("q0")
    await page.locator("#search").press("Enter")
    await expect(sessions).to_have_count(1000)  # the first 1000 read match: the rest is More
    await expect(more).to_be_visible()
    await more.click()
    await expect(sessions).to_have_count(1000)  # no q0... beyond q0999: the scan stops there
    await expect(more).to_be_hidden()
    assert browser.problems() == []


async def test_in_a_browser_a_wrong_token_shows_the_login_again(
    sims: list[SimInstance], start_router: StartRouter, browser: Browser
) -> None:
    from playwright.async_api import expect

    client, router = await started(sims, start_router)
    page = browser.page
    await page.goto(base(client) + "admin/")
    login_error = page.locator("#login-error")

    await sign_in(page, "a-wrong-token-of-16-chars")
    await expect(login_error).to_be_visible()
    await expect(login_error).to_contain_text("refused the token (the admin token is wrong)")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    assert await page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") is None

    await sign_in(page, TOKEN)
    await expect(page.locator("#instances tbody tr")).to_have_count(4)
    await expect(login_error).to_be_hidden()

    # The token rotated under the page (a SIGHUP reload): its next refresh is refused.
    rotated = "another-token-of-16-chars"
    router.config = dataclasses.replace(
        router.config, admin=dataclasses.replace(router.config.admin, token=rotated)
    )
    await expect(login_error).to_contain_text("refused the token")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    assert await page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") is None
    await sign_in(page, rotated)
    await expect(page.locator("#instances tbody tr")).to_have_count(4)
    assert browser.problems() == []
    assert (await client.get("/admin/status", headers=AUTH)).status == 401
