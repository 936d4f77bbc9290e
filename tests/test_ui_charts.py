"""The status page's live charts in a real headless Chromium against `genmlx demo` (a master and
an agent serving the demo model on loopback): each node's CPU, GPU, memory and network and each
model's tokens/s, time to first token and queue are drawn from the master's telemetry, keep
updating, say in words what they show, tell their series apart without colour, and load nothing
from outside the master. A screenshot is kept under test-artifacts/."""

from __future__ import annotations

import re

import pytest
from agent_harness import call
from test_telemetry import decode_for, start_demo
from test_ui_page import WAIT_MS, keep_screenshot
from test_ui_page import browser as browser  # a fixture, used by name

pytestmark = pytest.mark.e2e


def test_the_page_draws_live_charts_of_each_node_and_model(
    browser, spawn, genmlx_home, token, tmp_path, monkeypatch
):
    master = start_demo(spawn, monkeypatch, sample_s=0.5, poll_s=1)
    login = call("POST", f"{master}/api/v1/ui/login", token, {})
    assert login.status == 200, login.body

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(master) else elsewhere.append(r.url))
    page.goto(master + login.json()["url"])
    page.wait_for_selector("#live[data-state='live']", timeout=WAIT_MS)

    node = "#node-cards article"
    cpu = page.locator(f"{node} figure[data-chart='cpu']")
    cpu.locator("canvas").first.wait_for(timeout=WAIT_MS)
    for chart in ("cpu", "memory", "network"):
        figure = page.locator(f"{node} figure[data-chart='{chart}']")
        assert figure.get_attribute("data-state") == "drawn", chart
        assert figure.locator("canvas").count() >= 1, chart
    caption = cpu.locator("figcaption").inner_text()
    assert re.match(r"CPU over the last 5 minutes: CPU busy \d+% now, peak \d+%", caption), caption
    assert cpu.locator(".plot").get_attribute("aria-label") == caption, (
        "the words are there for screen readers too"
    )
    memory = page.locator(f"{node} figure[data-chart='memory'] figcaption").inner_text()
    assert re.search(r"used [\d.]+ [kMG]B now", memory), memory
    gpu = page.locator(f"{node} figure[data-chart='gpu']")
    assert gpu.get_attribute("data-state") == "absent", "no GPU here: said in words, not drawn as zero"
    assert "reports no GPU figures" in gpu.inner_text()

    # The charts keep updating without a reload: the CPU chart holds more samples as time passes.
    points = int(cpu.get_attribute("data-points"))
    page.wait_for_function(
        f"() => +document.querySelector(\"{node} figure[data-chart='cpu']\").dataset.points > {points + 2}",
        timeout=30_000,
    )

    # Decoding through the master shows on the model's charts, and on the node's CPU.
    model = "#model-cards article[data-model='genmlx-demo']"
    decode_for(f"{master}/v1", token, seconds=6)
    page.wait_for_function(
        f"""() => /generated [\\d.]+ tok\\/s now, peak ([1-9]|\\d\\d)/.test(
            document.querySelector("{model} figure[data-chart='tokens'] figcaption").textContent)""",
        timeout=30_000,
    )
    tokens = page.locator(f"{model} figure[data-chart='tokens']")
    assert tokens.locator("canvas").count() >= 1
    ttft = page.locator(f"{model} figure[data-chart='ttft'] figcaption").inner_text()
    assert re.search(r"mean .*peak \d+(\.\d+)? m?s", ttft), ttft
    queue = page.locator(f"{model} figure[data-chart='queue'] figcaption").inner_text()
    assert re.search(r"running \d+ now, peak [1-9]", queue), queue
    cpu_peak = int(re.search(r"peak (\d+)%", cpu.locator("figcaption").inner_text()).group(1))
    assert cpu_peak >= 45, "four streams decoding keep the CPU busy"

    # Without colour: each series has its own dash pattern, in the legend too, and its name.
    markers = tokens.locator(".u-legend .u-series:not(:first-child) .u-marker")  # the first: time
    styles = [markers.nth(i).evaluate("m => m.style.borderStyle") for i in range(markers.count())]
    assert styles == ["solid", "dashed"], styles
    legend = tokens.locator(".u-legend").inner_text()
    assert "generated" in legend and "prompt" in legend

    # The card is drawn again on every status the master pushes; its charts are kept, not redrawn.
    kept = f"{node} figure[data-chart='cpu'] canvas"
    page.locator(kept).evaluate("canvas => { canvas.dataset.kept = 'yes'; }")
    page.locator(node).evaluate("card => { card.dataset.old = 'yes'; }")
    page.wait_for_function(f'() => !document.querySelector("{node}").dataset.old', timeout=60_000)
    assert page.locator(f"{kept}[data-kept='yes']").count() == 1

    keep_screenshot(page, tmp_path, "ui-charts.png")
    assert not errors, errors
    assert not elsewhere, f"the page loaded something from outside the master: {elsewhere}"
