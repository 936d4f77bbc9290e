"""The status page in a real headless Chromium (Debian's, driven by Playwright) against a real
master and agent on loopback: signed in the way `genmlx ui` signs a user in, it shows the node and
the model, follows the stream without reloading, survives a master restart, never holds the token,
works from the keyboard and at phone width. Screenshots are kept under test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_harness import call
from conftest import ServingPorts, free_port, http_status, skip_or_fail, wait_until

pytestmark = pytest.mark.e2e  # every test here starts real processes

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 120_000  # loading a model on two slow cores, under a loaded test run


def skip_unless_chromium() -> None:
    """Skip (fail where ``CI`` is set, since CI must run these) without Chromium and Playwright."""
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get) as root"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is missing: pip install -e '.[test]'"
    skip_or_fail(problem, "status page tests")


@pytest.fixture
def browser():
    skip_unless_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


class Cluster:
    """`genmlx master` and `genmlx agent` on loopback, with demo models in the agent's storage;
    the master can be stopped and started again on the same port."""

    def __init__(self, spawn, root: Path, demo_model_dir: Path, token: str):
        self.spawn, self.root, self.token = spawn, root, token
        self.storage = root / "storage"
        for name in ("demo", "late"):
            shutil.copytree(demo_model_dir, self.storage / name)
        self.master_port, self.agent_port = free_port(), free_port()
        self.serving_ports = ServingPorts()
        self.url = f"http://127.0.0.1:{self.master_port}"
        spawn(
            ["-m", "genmlx", "agent", "--name", "a", "--storage", str(self.storage)]
            + ["--port", str(self.agent_port), "--host", "127.0.0.1"],
            "agent",
        )
        self.wait_answers(self.agent_port)
        self.start_master()

    def start_master(self) -> None:
        args = ["-m", "genmlx", "master", "--host", "127.0.0.1", "--port", str(self.master_port)]
        self.master = self.spawn(args, "master")
        self.wait_answers(self.master_port)

    def wait_answers(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: http_status(url) is not None, 30, 0.1, what=f"port {port} to answer")

    def apply(self, *models: str, source: str | None = None) -> None:
        """`genmlx apply` (no waiting) of a cluster of node a serving ``models`` (file sources)."""
        lines = "".join(
            f"    - {{name: {m}, source: '{source or f'file://{self.storage / m}'}', nodes: [a]}}\n"
            for m in models
        )
        manifest = self.root / "cluster.yaml"
        manifest.write_text(
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: deskpage}\nspec:\n"
            f"  master: {{node: a, port: {self.master_port}}}\n"
            f"  nodes:\n    - {{name: a, address: '127.0.0.1:{self.agent_port}', "
            f"storage: [{{path: '{self.storage}'}}]}}\n"
            f"  models:\n{self.serving_ports.set_in(lines)}"
        )
        command = [sys.executable, "-m", "genmlx", "apply", "-f", str(manifest)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def login_url(self) -> str:
        """What `genmlx ui` does: trade the token for a one-time sign-in address."""
        reply = call("POST", f"{self.url}/api/v1/ui/login", self.token, {})
        assert reply.status == 200, reply.body
        return self.url + reply.json()["url"]


@pytest.fixture
def cluster(spawn, genmlx_home, token, tmp_path, demo_model_dir) -> Cluster:
    return Cluster(spawn, tmp_path, demo_model_dir, token)


def model_ready(cluster: Cluster, name: str) -> bool:
    reply = call("GET", f"{cluster.url}/api/v1/status", cluster.token)
    models = {m["name"]: m for m in reply.json().get("models", [])} if reply.status == 200 else {}
    return models.get(name, {}).get("phase") == "Ready"


def keep_screenshot(page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / name
    shutil.copyfile(shot, kept)
    print(f"screenshot: {kept}")


def test_the_page_shows_the_cluster_and_follows_it_live(browser, cluster, tmp_path):
    cluster.apply("demo")
    wait_until(lambda: model_ready(cluster, "demo"), 180, 0.5, what="model demo to be Ready")

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.url} {r.headers} {r.post_data or ''}"))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    response = page.goto(cluster.login_url())
    assert response is not None and response.url == f"{cluster.url}/", "signed in, then sent to /"
    page.wait_for_selector("#live[data-state='live']", timeout=WAIT_MS)

    # The node and the model, with the model's state on the node in words.
    node = page.locator("#node-cards article", has_text="a")
    assert "online" in node.inner_text()
    assert "127.0.0.1:" in node.inner_text()
    demo = page.locator("tr[data-model='demo']")
    page.wait_for_function(
        "() => (document.querySelector(\"tr[data-model='demo'] td[data-node='a']\") || {})"
        ".textContent?.includes('serving rank 1 of 1')",
        timeout=WAIT_MS,
    )
    assert "Ready" in demo.locator("th").inner_text()
    badges = page.locator("#badges").text_content() or ""
    assert "Cluster: Ready" in badges and "Sync: Synced" in badges and "Health: Healthy" in badges
    card = page.locator("#model-cards article[data-model='demo']").inner_text()
    assert "http://127.0.0.1:" in card
    assert "Batching" in card and "maxBatch " in card and "per batch slot" in card, "how its batch was chosen"

    # A model added while the page is open goes from loading to Ready, without a reload: the page
    # records every state its row shows, and the same document (marker) stays loaded throughout.
    page.evaluate(
        """() => {
            window.pageMarker = 'no reload';
            window.lateStates = [];
            const note = () => {
                const row = document.querySelector("tr[data-model='late']");
                const text = row ? row.textContent : null;
                if (text && window.lateStates.at(-1) !== text) window.lateStates.push(text);
            };
            const all = {subtree: true, childList: true, characterData: true};
            new MutationObserver(note).observe(document.body, all);
        }"""
    )
    cluster.apply("demo", "late")
    page.wait_for_function(
        "() => (document.querySelector(\"tr[data-model='late'] th\") || {}).textContent?.includes('Ready')",
        timeout=WAIT_MS,
    )
    states = page.evaluate("window.lateStates")
    print("states of model late on the page:", states)
    assert page.evaluate("window.pageMarker") == "no reload"
    assert states and "serving" not in states[0], f"late is first shown before it serves: {states}"
    assert "Ready" in states[-1] and "serving rank 1 of 1" in states[-1]
    assert "late" in page.locator("#event-list").inner_text(), "its events arrived through the stream"

    keep_screenshot(page, tmp_path, "ui-cluster.png")

    # The token never reaches the page: not in the DOM, storage, cookies, nor any request it made.
    token = cluster.token
    assert token not in page.content()
    stored = "JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})"
    assert token not in page.evaluate(stored)
    assert token not in page.evaluate("document.cookie")
    assert all(token not in c["value"] for c in context.cookies())
    assert requests and all(token not in r for r in requests)
    assert not errors, errors
    context.close()


def test_the_page_reconnects_after_the_master_restarts(browser, cluster, tmp_path):
    cluster.apply("demo")
    page = browser.new_page()
    page.goto(cluster.login_url())
    page.wait_for_selector("#live[data-state='live']", timeout=WAIT_MS)
    page.evaluate("window.pageMarker = 'no reload'")

    cluster.master.stop()
    page.wait_for_selector("#live[data-state='down']", timeout=WAIT_MS)
    assert "reconnecting" in page.locator("#live").inner_text()

    cluster.start_master()  # the session cookie is stateless: it holds across the restart
    page.wait_for_selector("#live[data-state='live']", timeout=WAIT_MS)
    page.wait_for_selector("tr[data-model='demo']", timeout=WAIT_MS)
    assert page.evaluate("window.pageMarker") == "no reload"
    assert page.locator("#signin").is_hidden()


def test_without_a_session_the_page_shows_only_how_to_sign_in(browser, cluster):
    cluster.apply("demo")
    page = browser.new_page()
    response = page.goto(f"{cluster.url}/")
    assert response is not None and response.status == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.wait_for_selector("#signin:not([hidden])", timeout=WAIT_MS)
    assert "genmlx ui" in page.locator("#signin").inner_text()
    assert page.locator("#content").is_hidden()
    assert page.locator("#node-cards > *").count() == 0
    assert "deskpage" not in page.locator("body").inner_text()

    used = cluster.login_url()
    page.goto(used)
    wrong = page.goto(used)  # a sign-in address works once
    assert wrong is not None and wrong.status == 401
    assert "genmlx ui" in page.locator("body").inner_text()


def test_keyboard_and_phone_width(browser, cluster, tmp_path):
    cluster.apply("demo")
    wait_until(lambda: model_ready(cluster, "demo"), 180, 0.5, what="model demo to be Ready")
    page = browser.new_page(viewport={"width": 375, "height": 800}, color_scheme="dark")
    page.goto(cluster.login_url())
    page.wait_for_selector("tr[data-model='demo']", timeout=WAIT_MS)

    # Tab reaches the skip link, each section's link and the models matrix.
    reached = []
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.append(
            page.evaluate(
                "() => { const e = document.activeElement;"
                " return e.id || e.getAttribute('aria-label') || e.textContent.trim().slice(0, 40); }"
            )
        )
    print("Tab order:", reached)
    for stop in ("Skip to the cluster status", "At a glance", "Nodes", "Models", "Events", "matrix-wrap"):
        assert stop in reached, f"{stop!r} is not reachable with Tab: {reached}"
    page.get_by_role("link", name="Events").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'events'")

    # No horizontal scrolling at phone width, long storage paths included.
    width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways at 375 px: {width}"
    keep_screenshot(page, tmp_path, "ui-phone.png")


def test_a_model_that_cannot_be_had_shows_why_in_its_cell(browser, cluster, tmp_path):
    cluster.apply("ghost", source=f"file://{tmp_path / 'nowhere' / 'ghost'}")
    page = browser.new_page()
    page.goto(cluster.login_url())
    cell = "tr[data-model='ghost'] td[data-node='a']"
    page.wait_for_function(
        f"() => (document.querySelector(\"{cell}\") || {{}}).textContent?.includes('failed:')",
        timeout=WAIT_MS,
    )
    text = page.locator(cell).inner_text()
    print("cell of model ghost:", text)
    assert "nowhere" in text, "the reason, with the path it names, is in the cell"
    badges = page.locator("#badges").text_content() or ""
    print("badges:", badges)
    assert "Cluster: Not ready" in badges and "Sync: OutOfSync" in badges


def test_the_integrations_section_offers_each_client_as_blocks_to_copy(browser, cluster, tmp_path):
    import tomllib

    cluster.apply("demo")
    wait_until(lambda: model_ready(cluster, "demo"), 180, 0.5, what="model demo to be Ready")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=cluster.url)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.url} {r.headers} {r.post_data or ''}"))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(cluster.login_url())
    codex = page.locator("#integrations article[data-client='codex']")
    codex.locator("pre").first.wait_for(timeout=WAIT_MS)

    clients = page.locator("#integrations article").evaluate_all("els => els.map(e => e.dataset.client)")
    assert clients == ["claude-code", "codex", "opencode", "cline", "openwebui"]
    blocks = page.locator("#integrations pre")
    assert blocks.count() == page.locator("#integrations button.copy").count() >= len(clients)
    claude = page.locator("#integrations article[data-client='claude-code'] pre").inner_text()
    assert f"export ANTHROPIC_BASE_URL={cluster.url}\n" in claude
    assert 'export ANTHROPIC_AUTH_TOKEN="$(genmlx token --show)"' in claude
    assert "export ANTHROPIC_MODEL=demo" in claude

    # The copy button puts the block's exact text on the clipboard: the TOML Codex reads.
    codex.get_by_role("button", name="Copy ~/.codex/config.toml for Codex CLI").click()
    page.wait_for_selector("#integrations article[data-client='codex'] button.copy[data-state='copied']")
    config = tomllib.loads(page.evaluate("navigator.clipboard.readText()"))
    assert config["model"] == "demo"
    assert config["model_providers"]["genmlx"]["base_url"] == f"{cluster.url}/v1"
    keep_screenshot(page, tmp_path, "ui-integrations.png")

    token = cluster.token
    assert token not in page.content()
    assert token not in page.evaluate("navigator.clipboard.readText()")
    assert requests and all(token not in r for r in requests)
    assert not errors, errors
    context.close()


def test_without_the_clipboard_api_copy_selects_the_block(browser, cluster):
    # A master on the LAN is plain http, where browsers offer no clipboard API.
    cluster.apply("demo")
    wait_until(lambda: model_ready(cluster, "demo"), 180, 0.5, what="model demo to be Ready")
    context = browser.new_context()
    context.add_init_script("Object.defineProperty(navigator, 'clipboard', { value: undefined })")
    page = context.new_page()
    page.goto(cluster.login_url())
    opencode = page.locator("#integrations article[data-client='opencode']")
    opencode.locator("pre").first.wait_for(timeout=WAIT_MS)
    button = opencode.locator("button.copy").first
    button.click()
    assert button.get_attribute("data-state") in ("copied", "selected")
    selected = page.evaluate("window.getSelection().toString()")
    assert selected == opencode.locator("pre code").first.text_content()
    assert '"@ai-sdk/openai-compatible"' in selected
    context.close()


def test_impostors_and_a_token_rotation_show_on_the_page(browser, cluster, spawn, tmp_path):
    """Node b's declared address answers, but unsigned: the page lists it as an impostor. A manual
    rotation of the token shows until when the old token counts, and who still holds it."""
    rogue_port = free_port()
    rogue = Path(__file__).with_name("rogue_agent.py")
    spawn(
        [str(rogue), "b", "127.0.0.1", str(rogue_port), str(tmp_path / "rogue.jsonl"), "--no-announce"],
        "rogue",
    )
    cluster.wait_answers(rogue_port)
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(
        "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: deskpage}\nspec:\n"
        f"  master: {{node: a, port: {cluster.master_port}}}\n  nodes:\n"
        + "".join(
            f"    - {{name: {name}, address: '127.0.0.1:{port}', storage: [{{path: '{cluster.storage}'}}]}}\n"
            for name, port in (("a", cluster.agent_port), ("b", rogue_port))
        )
        + "  models: []\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "genmlx", "apply", "-f", str(manifest)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rotated = subprocess.run(
        [sys.executable, "-m", "genmlx", "token", "rotate", "--grace", "1h", "--manual"],
        capture_output=True,
        text=True,
    )
    assert rotated.returncode == 0, rotated.stderr
    page = browser.new_page()
    page.goto(cluster.login_url())
    page.wait_for_selector("#impostors li", timeout=WAIT_MS)
    page.wait_for_selector("#rotation p", timeout=WAIT_MS)
    impostor = page.locator("#impostors li").inner_text()
    rotation = page.locator("#rotation p").inner_text()
    print("impostor:", impostor, "| rotation:", rotation)
    assert impostor.startswith(f"b at 127.0.0.1:{rogue_port}: ") and "not a GenMLX agent" in impostor
    assert "The old cluster token counts until" in rotation and "Every node holds the new one." in rotation
    keep_screenshot(page, tmp_path, "impostor-and-rotation.png")
