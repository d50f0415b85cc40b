"""The search page in a real browser: Debian's chromium, headless, driven by Playwright
(``executable_path=/usr/bin/chromium``; no browser is ever downloaded).

The stack: the demo's synthetic videos ingested through the real broker by a real
worker with the shipped trained model (deploy/models, whatever version it is now),
then Serve running the ingress, the reranker and the page. A caption is typed into
the page; the first card must be the captioned video, its thumbnail must have
loaded, and its player must stand at the best moment. A screenshot is saved in the
test's tmp dir and named in every failure message.

``VIDSEARCH_SCREENSHOT=docs/search-page.png`` also copies the screenshot there (how
the README's picture is made).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from query_support import base_settings, free_port, ingest_through_broker, small_options, wait_until
from web_support import Http, web_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
N_VIDEOS = 8
MOMENT_TOLERANCE_S = 0.05
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page_stack(ray_local, broker, tmp_path_factory):
    """The demo's first N_VIDEOS videos, indexed with the shipped model and served."""
    from ray import serve

    from vidsearch.models.shipped import install_shipped_model
    from vidsearch.services.query.deploy import deploy
    from vidsearch.services.stack.demo import ensure_dataset
    from vidsearch.synth import load_manifest

    root = tmp_path_factory.mktemp("web-demo")
    records = load_manifest(ensure_dataset(root / "synth", N_VIDEOS))
    settings = base_settings(bootstrap=broker.bootstrap, store_path=root / "store", video_root=root / "synth",
                             registry=root / "registry", alias="videos", grpc_port=free_port())
    settings = web_settings(settings.model_copy(update={"model": settings.model.model_copy(
        update={"preset": "synth-resnet", "use_shipped": True})}))
    shipped = install_shipped_model(settings)
    assert shipped is not None, "no shipped model in deploy/models"
    _, version = ingest_through_broker(settings, [
        {"op": "upsert", "video_id": r.video_id, "uri": r.uri, "metadata": r.metadata} for r in records])
    assert version == shipped

    http_port = free_port()
    deploy(settings, ingress_options=small_options(), reranker_options=small_options(),
           web_options=small_options(), http_port=http_port)
    http = Http(http_port)
    try:
        # Until the reranker is warm: a cold one would make the first answer recall-only.
        wait_until(lambda: http.search({"q": records[0].captions[0], "top_k": 1}).json().get("reranked"), 180,
                   "a re-ranked answer from the page's API")
        yield {"http": http, "records": records, "version": version, "url": f"http://127.0.0.1:{http_port}/"}
    finally:
        serve.shutdown()


def pick_caption(http: Http, records: list[Any]) -> tuple[str, str]:
    """A caption the served model ranks its own video first for (the first such, in
    manifest order): the test checks the page, not the model, whose version may change."""
    tried = []
    for record in records:
        for caption in record.captions:
            top = http.search({"q": caption, "top_k": 1}).json()["results"]
            tried.append((caption, record.video_id, top[0]["video_id"] if top else None))
            if top and top[0]["video_id"] == record.video_id:
                return caption, record.video_id
    raise AssertionError(f"the served model ranks no caption's own video first: {tried}")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does this)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def test_typing_a_caption_shows_its_video_first_playing_from_the_best_moment(page_stack, browser, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    caption, expected = pick_caption(page_stack["http"], page_stack["records"])
    base = page_stack["url"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    screenshot = tmp_path / "search-page.png"

    def shot() -> Path:
        page.screenshot(path=str(screenshot), full_page=True)
        return screenshot

    def check(condition: bool, what: str) -> None:
        if not condition:
            raise AssertionError(f"{what} (screenshot: {shot()})")

    def wait(expression: str, what: str) -> Any:
        # As a function: the page's CSP (no 'unsafe-eval') refuses a string predicate.
        try:
            return page.wait_for_function(f"() => ({expression})").json_value()
        except PlaywrightTimeout:
            raise AssertionError(f"timed out waiting for {what} (screenshot: {shot()})") from None

    first_card = "document.querySelector('#results > li')"
    page.goto(base)
    # Keyboard only: the query box has focus on load; Enter submits.
    check(page.evaluate("document.activeElement && document.activeElement.id") == "q", "query box focused on load")
    page.keyboard.type(caption)
    page.keyboard.press("Enter")
    wait("document.querySelector('#results').dataset.state === 'done'", "the results")
    cards = page.locator("#results > li")
    check(cards.count() >= 1, "at least one result card")
    check(cards.first.get_attribute("data-video-id") == expected,
          f"the first card is {expected}, the video of {caption!r} (got {cards.first.get_attribute('data-video-id')})")
    moment = float(cards.first.get_attribute("data-moment"))
    api = page_stack["http"].search({"q": caption}).json()
    check(abs(api["results"][0]["best_moment_seconds"] - moment) < 1e-3, "the card shows the API's best moment")
    status = page.locator("#status").inner_text()
    check(page_stack["version"] in status and "re-ranked" in status and "recall" in status,
          f"model version and stage timings shown (status: {status!r})")

    width = wait(f"(img => img.complete && img.naturalWidth > 0 ? img.naturalWidth : false)"
                 f"({first_card}.querySelector('img.thumb'))", "the first thumbnail to load")
    check(width > 0, "the thumbnail has a width")
    wait(f"{first_card}.querySelector('video').readyState >= 1", "the first player to load its metadata")
    current = page.evaluate(f"{first_card}.querySelector('video').currentTime")
    check(abs(current - moment) <= MOMENT_TOLERANCE_S,
          f"the player stands at the best moment {moment:.3f}s (currentTime {current:.3f}s)")
    shot()
    if os.environ.get("VIDSEARCH_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["VIDSEARCH_SCREENSHOT"])

    # The thumbnail is a button: Enter on it plays the video from there.
    page.focus("#results > li .poster")
    page.keyboard.press("Enter")
    wait(f"!{first_card}.querySelector('video').paused", "the player to start after Enter on the thumbnail")
    check(page.evaluate(f"{first_card}.querySelector('video').currentTime") >= moment - MOMENT_TOLERANCE_S,
          "playback starts at the best moment")

    outside = [url for url in requested if not (url.startswith(base) or url.startswith("data:"))]
    check(not outside, f"no request leaves the server: {outside}")
    check(not problems, f"no console errors: {problems}")


def test_a_bad_request_shows_the_servers_message(page_stack, browser, tmp_path):
    page = browser.new_page()
    page.goto(page_stack["url"] + "?q=a+red+circle&top_k=500")
    page.wait_for_function("() => document.querySelector('#results').dataset.state === 'error'")
    message = page.locator("#error").inner_text()
    if not message.startswith("top_k:"):
        path = tmp_path / "bad-request.png"
        page.screenshot(path=str(path))
        raise AssertionError(f"expected the server's top_k message, got {message!r} (screenshot: {path})")
