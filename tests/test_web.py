"""The page at /app/, used the way people use it: in a real (headless) Chromium.

The browser is Debian's ``chromium`` driven through Debian's ``/usr/bin/chromedriver``
(Selenium's Service is given that path, so Selenium Manager never runs and nothing is
downloaded). A browser that cannot start fails the test and says why; it never skips.

Screenshots of each step go to ``var/web-screenshots/`` (printed in the test output). Set
``REDPACKET_UPDATE_README_SCREENSHOT=1`` to copy the open step to ``docs/img/app-open.png``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from redpacket.cli.children import free_ports
from redpacket.core.ids import snowflake_of
from redpacket.gateway.app import create_app
from redpacket.gateway.settings import GatewaySettings
from redpacket.gateway.webapp import STATIC_DIR
from redpacket.sharding.ring import NodeSpec, RingDoc
from tests.conftest import Cluster, sql

REPO = Path(__file__).parents[1]
SHOTS = REPO / "var" / "web-screenshots"
README_SHOT = REPO / "docs" / "img" / "app-open.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root here
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=390,844",  # a phone
    "--force-device-scale-factor=2",
    "--lang=zh-CN",
    "--hide-scrollbars",
)
WAIT_S = 30  # generous: the machine is shared, and Chromium is slow to start under load


# -- a production gateway, in process: the dev login is off by default -----------------------


@pytest_asyncio.fixture(scope="module")
async def production_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A gateway configured as production would be: only the required settings."""
    ring_file = tmp_path_factory.mktemp("ring") / "ring.json"
    RingDoc(1, (NodeSpec("shard-0", "http://127.0.0.1:9"),)).save(ring_file)
    settings = GatewaySettings.from_env(
        {
            "REDPACKET_RING_FILE": str(ring_file),
            "REDPACKET_JWT_SECRET": secrets.token_urlsafe(32),
            "REDPACKET_NODE_SECRET": secrets.token_hex(16),
            "REDPACKET_METRICS_PORT": "0",
        }
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """GET with the request target exactly as given: no client-side normalising of '..'."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_dev_login_is_absent_by_default(production_gateway: str) -> None:
    assert GatewaySettings.dev_login is False
    async with aiohttp.ClientSession() as session:
        for method in ("POST", "GET"):
            async with session.request(
                method, production_gateway + "/dev/login", json={"uid": "1", "name": "Mallory"}
            ) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "not_found"
                assert "token" not in await resp.text()


async def test_the_page_is_served_with_security_headers(production_gateway: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(production_gateway + "/app/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
            headers = resp.headers
        assert "<script" in page and 'src="app.js"' in page
        csp = headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert directives["default-src"] == "'none'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        # no inline script or style for the CSP to have to allow
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page)
        assert "<style" not in page and " style=" not in page
        async with session.get(production_gateway + "/app/app.js") as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with session.get(production_gateway + "/app", allow_redirects=False) as resp:
            assert resp.status == 308 and resp.headers["Location"] == "/app/"


async def test_every_shipped_file_is_served_and_nothing_outside_the_folder(
    production_gateway: str,
) -> None:
    shipped = [p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert {"index.html", "app.js", "app.css"} <= set(shipped)
    for name in shipped:
        status, body = await raw_get(production_gateway, f"/app/{name}")
        assert (status, body) == (200, (STATIC_DIR / name).read_bytes())
    outside = (STATIC_DIR.parent / "app.py").read_bytes()
    secret_marker = b"def create_app"
    assert secret_marker in outside
    for target in (
        "/app/../app.py",
        "/app/static/../app.py",
        "/app/..%2fapp.py",
        "/app/%2e%2e/app.py",
        "/app/%2e%2e%2fapp.py",
        "/app/%252e%252e%252fapp.py",
        "/app/..%5capp.py",
        "/app/....//app.py",
        "/app//etc/passwd",
        "/app/%2fetc%2fpasswd",
        "/app/../../../../etc/passwd",
        "/app/./index.html/../../settings.py",
        "/app/index.html%00.py",
    ):
        status, body = await raw_get(production_gateway, target)
        assert status in (400, 404), (target, status)
        assert secret_marker not in body and b"root:" not in body, target


# -- the dev login of a local cluster --------------------------------------------------------


async def test_dev_login_gives_a_token_that_is_never_cached(cluster: Cluster) -> None:
    assert cluster.session is not None
    async with cluster.session.post(
        cluster.url + "/dev/login", json={"uid": "4242", "name": "阿明"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        login = await resp.json()
    assert (login["uid"], login["name"]) == ("4242", "阿明")
    headers = {"Authorization": f"Bearer {login['token']}"}
    status, packet = await cluster.call(
        "POST", "/v1/red-packets", body={"total_amount": 100, "total_packet": 1}, headers=headers
    )
    assert (status, packet["uid"]) == (201, "4242")
    for body, field_name in (
        ({"uid": 4242, "name": "x"}, "uid"),
        ({"uid": "0", "name": "x"}, "uid"),
        ({"uid": "4242", "name": ""}, "name"),
        ({"uid": "4242", "name": "a\nb"}, "name"),
        ({"uid": "4242", "name": "x" * 33}, "name"),
    ):
        status, error = await cluster.call("POST", "/dev/login", body=body)
        assert (status, error["error"]["code"], error["error"]["field"]) == (
            400,
            "invalid_field",
            field_name,
        )
    status, error = await cluster.call(
        "POST", "/dev/login", body={"uid": "1", "name": "x", "admin": True}
    )
    assert (status, error["error"]["code"]) == (400, "unknown_field")


# -- people in browsers ----------------------------------------------------------------------


@dataclass
class Browsers:
    """Headless Chromium sessions, one per person, each with a fresh profile."""

    shots: Path
    started: list[Any] = field(default_factory=list)
    count: int = 0

    def start(self) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        for path in (CHROMIUM, CHROMEDRIVER):
            if not os.access(path, os.X_OK):
                pytest.fail(
                    f"{path} is missing: the browser test needs Debian's chromium and "
                    "chromium-driver (`bash .ci/setup` installs them)"
                )
        profile = tempfile.mkdtemp(prefix="redpacket-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        service = Service(
            executable_path=CHROMEDRIVER, log_output=str(self.shots / "chromedriver.log")
        )
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except Exception as exc:
            shutil.rmtree(profile, ignore_errors=True)
            pytest.fail(f"headless Chromium did not start ({CHROMIUM} via {CHROMEDRIVER}): {exc}")
        driver.profile_dir = profile
        self.started.append(driver)
        return driver

    def shot(self, driver: Any, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        assert driver.save_screenshot(str(path)), f"could not save {path}"
        return path

    def quit(self, driver: Any) -> None:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)
        self.started.remove(driver)


@contextmanager
def browsers(shots: Path) -> Iterator[Browsers]:
    made = Browsers(shots)
    try:
        yield made
    finally:
        for driver in list(made.started):
            made.quit(driver)


def wait_for(driver: Any, what: str, check: Callable[[Any], Any], timeout_s: float = WAIT_S) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(check)
    except TimeoutException:
        logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
        pytest.fail(f"timed out waiting for {what}; page at {driver.current_url}; console {logs}")


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def visible(element_id: str) -> Callable[[Any], Any]:
    def check(driver: Any) -> Any:
        element = by_id(driver, element_id)
        return element if element.is_displayed() else None

    return check


def sign_in(driver: Any, url: str, uid: int, name: str, shots: Browsers | None = None) -> None:
    driver.get(url)
    wait_for(driver, "the sign-in form", visible("signin-uid"))
    by_id(driver, "signin-uid").send_keys(str(uid))
    by_id(driver, "signin-name").send_keys(name)
    if shots is not None:
        shots.shot(driver, "sign-in")
    by_id(driver, "signin-button").click()
    wait_for(driver, "signed in", lambda d: not by_id(d, "view-signin").is_displayed())
    token = driver.execute_script("return sessionStorage.getItem('redpacket.token')")
    assert token and token not in driver.current_url


def yuan(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def cents_of(text: str) -> int:
    whole, frac = re.fullmatch(r"(\d+)\.(\d\d)元?", text.strip()).groups()  # type: ignore[union-attr]
    return int(whole) * 100 + int(frac)


@dataclass
class Seen:
    packet_id: str = ""
    opened: dict[int, int] = field(default_factory=dict)  # uid -> cents shown after 開
    records: dict[int, int] = field(default_factory=dict)  # uid -> cents in the records list
    luckiest: list[int] = field(default_factory=list)
    received_total: int | None = None


SENDER, OPENERS, LATE = 7_310_001, (7_310_002, 7_310_003, 7_310_004), 7_310_005
NAMES = {SENDER: "阿明", 7_310_002: "小红", 7_310_003: "Bob", 7_310_004: "小美", LATE: "迟到的人"}


def people_send_and_open(base_url: str, shots: Path) -> Seen:
    """The story, in browsers: one sends 8.88 in 3 shares, three open, a fourth is too late."""
    seen = Seen()
    with browsers(shots) as people:
        sender = people.start()
        sign_in(sender, base_url + "/app/", SENDER, NAMES[SENDER], people)
        wait_for(sender, "the send form", visible("send-amount"))
        by_id(sender, "send-shares").send_keys("3")
        by_id(sender, "send-amount").send_keys("8.88")
        by_id(sender, "send-greeting").send_keys("新年快乐，万事如意")
        assert by_id(sender, "send-total-value").text == "8.88"
        people.shot(sender, "send")
        by_id(sender, "send-button").click()
        link_el = wait_for(sender, "the link to the new packet", visible("sent-link"))
        link = link_el.text
        match = re.fullmatch(re.escape(base_url) + r"/app/#/p/([A-Za-z0-9_-]{22})", link)
        assert match, link
        seen.packet_id = match.group(1)
        people.shot(sender, "sent")
        by_id(sender, "sent-open").click()  # the sender watches the packet while people open it
        wait_for(sender, "the sender's packet page", lambda d: d.current_url == link)
        wait_for(sender, "the packet", lambda d: by_id(d, "open-button").is_enabled())

        for uid in OPENERS:
            person = people.start()
            sign_in(person, link, uid, NAMES[uid])
            wait_for(person, "the 開 button", lambda d: by_id(d, "open-button").is_enabled())
            assert NAMES[SENDER] in by_id(person, "sender-name").text  # the sender, by name
            assert by_id(person, "greeting").text == "新年快乐，万事如意"
            people.shot(person, f"packet-{uid}")
            by_id(person, "open-button").click()
            if uid == OPENERS[0]:  # the coin turns while grab and open are on their way
                state = by_id(person, "envelope").get_attribute("data-state")
                assert state in ("opening", "opened"), state
                people.shot(person, "opening")
            amount = wait_for(person, "the amount", visible("amount-box"))
            assert amount.is_displayed()
            seen.opened[uid] = cents_of(by_id(person, "amount").text)
            assert by_id(person, "amount").get_attribute("data-cents") == str(seen.opened[uid])
            wait_for(
                person,
                "my record in the list",
                lambda d, uid=uid: d.find_elements("css selector", f'#records [data-uid="{uid}"]'),
            )
            time.sleep(0.6)  # let the amount's pop animation finish for the screenshot
            people.shot(person, f"opened-{uid}")
            if uid == OPENERS[0] and os.environ.get("REDPACKET_UPDATE_README_SCREENSHOT"):
                README_SHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shots / f"{people.count:02d}-opened-{uid}.png", README_SHOT)
            people.quit(person)

        late = people.start()
        sign_in(late, link, LATE, NAMES[LATE])
        outcome = wait_for(late, "sold out", visible("outcome"))
        assert outcome.get_attribute("data-reason") == "sold_out"
        assert outcome.text == "手慢了，红包派完了"
        assert not by_id(late, "amount-box").is_displayed()
        people.shot(late, "sold-out")
        people.quit(late)

        # the sender's page, never reloaded, caught up: everyone's share, and 手气最佳

        def all_records(d: Any) -> Any:
            items = d.find_elements("css selector", "#records li")
            done = len(items) == 3 and d.find_elements("css selector", "#records li.luckiest")
            return items if done else None

        items = wait_for(sender, "three records", all_records)
        for item in items:
            uid = int(item.get_attribute("data-uid"))
            shown = cents_of(item.find_element("css selector", ".amt").text)
            assert shown == int(item.get_attribute("data-cents"))
            seen.records[uid] = shown
            if "luckiest" in (item.get_attribute("class") or ""):
                assert item.find_element("css selector", ".badge").text == "手气最佳"
                seen.luckiest.append(uid)
        assert "3个红包共8.88元" in by_id(sender, "summary").text
        assert by_id(sender, "outcome").text == "红包已被领完"  # the sender is not "too slow"
        people.shot(sender, "records")

        # 我的红包: the first opener's year, once the history has caught up
        me = people.start()
        sign_in(me, base_url + "/app/#/me", OPENERS[0], NAMES[OPENERS[0]])

        def caught_up(d: Any) -> Any:
            total = by_id(d, "me-total").get_attribute("data-cents")
            if total and int(total) == seen.opened[OPENERS[0]]:
                return total
            time.sleep(0.5)
            d.refresh()
            return None

        seen.received_total = int(wait_for(me, "my red packets", caught_up))
        assert by_id(me, "me-total").text == f"{yuan(seen.received_total)}元"
        mine = f'#me-list [data-packet-id="{seen.packet_id}"]'
        assert me.find_elements("css selector", mine)
        people.shot(me, "my-red-packets")
    return seen


async def test_people_send_and_open_a_red_packet_in_the_browser(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    shots = SHOTS / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    shots.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\n[test_web] screenshots: {shots}")

    seen = await asyncio.to_thread(people_send_and_open, cluster.url, shots)

    # what the page showed is what the ledger holds, to the cent
    shard = {n.name: n for n in cluster.nodes()}[cluster.shard_of(snowflake_of(seen.packet_id))]
    assert shard.mysql
    [(total_amount, total_packet, greeting, uid)] = await sql(
        shard.mysql,
        "SELECT total_amount, total_packet, greeting, uid FROM red_packet_info "
        "WHERE red_packet_id = %s",
        (snowflake_of(seen.packet_id),),
    )
    assert (total_amount, total_packet, greeting, uid) == (888, 3, "新年快乐，万事如意", SENDER)
    ledger = {
        int(u): int(a)
        for u, a in await sql(
            shard.mysql,
            "SELECT uid, amount FROM red_packet_record WHERE red_packet_id = %s",
            (snowflake_of(seen.packet_id),),
        )
    }
    assert ledger == seen.opened == seen.records
    assert sum(ledger.values()) == 888 and set(ledger) == set(OPENERS)
    best = max(ledger.values())  # 手气最佳: the highest share, as the API decided it
    assert len(seen.luckiest) == 1 and ledger[seen.luckiest[0]] == best
    assert seen.received_total == ledger[OPENERS[0]]
    await cluster.check()


WALLET_SENDER, WALLET_OPENER = 7_320_001, 7_320_002


def sender_runs_out_and_opener_is_credited(base_url: str, shots: Path) -> dict[str, Any]:
    """Starting balance 10.00: the sender sends 8.88 (one share), the bar shows 1.12; a second
    packet of 5.00 is 余额不足 and changes nothing. The opener's balance grows by the share,
    入账中 until the credit lands, and 零钱明细 lists it."""
    seen: dict[str, Any] = {}
    with browsers(shots) as people:
        sender = people.start()
        sign_in(sender, base_url + "/app/", WALLET_SENDER, "有钱人")
        wait_for(sender, "the balance", lambda d: by_id(d, "balance").text == "¥10.00")
        by_id(sender, "send-shares").send_keys("1")
        by_id(sender, "send-amount").send_keys("8.88")
        by_id(sender, "send-button").click()
        link = wait_for(sender, "the link", visible("sent-link")).text
        wait_for(sender, "the debit", lambda d: by_id(d, "balance").text == "¥1.12")
        by_id(sender, "send-amount").clear()
        by_id(sender, "send-amount").send_keys("5.00")
        by_id(sender, "send-button").click()
        error = wait_for(sender, "余额不足", lambda d: by_id(d, "send-error").text or None)
        assert error == "余额不足：零钱只有1.12元", error
        people.shot(sender, "insufficient-funds")
        seen["sender_balance"] = by_id(sender, "balance").get_attribute("data-cents")

        opener = people.start()
        sign_in(opener, link, WALLET_OPENER, "幸运儿")
        wait_for(opener, "the 開 button", lambda d: by_id(d, "open-button").is_enabled())
        by_id(opener, "open-button").click()
        wait_for(opener, "the amount", visible("amount-box"))
        seen["opened"] = cents_of(by_id(opener, "amount").text)
        wait_for(
            opener, "the credit", lambda d: by_id(d, "amount-note").text == "已存入零钱" or None
        )
        wait_for(opener, "the new balance", lambda d: by_id(d, "balance").text == "¥18.88")
        people.shot(opener, "credited")
        by_id(opener, "nav-wallet").click()
        wait_for(opener, "零钱明细", lambda d: d.find_elements("css selector", "#wallet-list li"))
        kinds = [
            li.get_attribute("data-kind")
            for li in opener.find_elements("css selector", "#wallet-list li")
        ]
        seen["opener_kinds"] = kinds
        people.shot(opener, "wallet")
    return seen


async def test_a_sender_runs_out_of_money_and_an_openers_balance_grows_in_the_browser(
    make_cluster: Any,
) -> None:
    cluster: Cluster = await make_cluster(args=("--starting-balance", "1000"))
    shots = SHOTS / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-wallet")
    shots.mkdir(parents=True, exist_ok=True)
    seen = await asyncio.to_thread(sender_runs_out_and_opener_is_credited, cluster.url, shots)
    assert seen["sender_balance"] == "112"
    assert seen["opened"] == 888
    assert seen["opener_kinds"] == ["receive", "grant"]
    await cluster.check()
