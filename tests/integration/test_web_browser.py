"""The browser page in a real browser: Debian's headless Chromium, driven through chromium-driver (selenium),
against the service with the page on (the tiny model, one in-process stage). What a person would check: frames
advance at the asked fps, a prompt change shows, the camera comes back restyled within its budget, closing the
tab frees the stream, a bad message is shown and the stream goes on, and without a token nothing starts."""

import time

import pytest

from tests.secured import start, write_tokens
from tests.web_helpers import BUDGET_MS, FPS, NO_BROWSER, Page, chromium, wait_for, web_config

pytestmark = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")


@pytest.fixture(scope="module")
def server():
    running = start(web_config())
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def driver():
    pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
    browser = chromium()
    try:
        yield browser
    finally:
        browser.quit()


def url(server) -> str:
    return server.service.web.address


def streams(server) -> dict:
    return dict(server.service.servicer.streams)


def freed(server) -> bool:
    replica = server.service.replicas[0]
    return not server.service.servicer.streams and replica.active() == 0 and sum(replica.cache_bytes()) == 0


def test_frames_advance_at_the_asked_fps_and_a_prompt_change_shows(server, driver):
    page = Page(driver, url(server))
    assert not page.el("token-row").is_displayed()  # an open server: no token asked
    page.start(fps=FPS)
    assert wait_for(lambda: page.frames() >= 8, 30), page.message()
    (stream_id,) = streams(server)  # the page's stream is one of the server's streams, under the same id
    assert stream_id in page.message()
    first = page.shot()
    time.sleep(1.0)
    second = page.shot()
    assert first != second, "the video area did not change in a second"
    time.sleep(2.5)  # the stats window (2 s) is all steady state
    fps = [page.stats()["fps"] for _ in range(3) if not time.sleep(0.3)]
    assert all(abs(f - FPS) <= 0.1 * FPS for f in fps), fps
    stats = page.stats()
    assert stats["revision"] == 0 and stats["what"] in ("behind due", "ahead of due") and stats["latency_ms"] is not None

    page.set("prompt", "a charcoal sketch of a lighthouse")
    page.click("change")
    assert wait_for(lambda: page.stats()["revision"] == 1, 10), page.text("stats")
    shown = page.frames()
    before = page.shot()
    time.sleep(1.0)
    assert page.frames() >= shown + FPS * 0.8, "frames stopped after the prompt change"
    assert page.shot() != before
    assert list(streams(server)) == [stream_id]  # the same stream, changed in place

    page.click("stop")
    assert wait_for(lambda: page.message() == "stopped", 5), page.message()
    assert wait_for(lambda: freed(server), 2.0)


def test_a_bad_message_from_the_page_is_shown_and_the_stream_goes_on(server, driver):
    page = Page(driver, url(server))
    page.start(fps=FPS)
    assert wait_for(lambda: page.frames() >= 4, 30), page.message()
    (stream_id,) = streams(server)
    driver.execute_script("window.streamgenPage.sendRaw('{\"type\": \"control\", \"prompt\": ')")
    assert wait_for(lambda: page.message() == "Error: the message is not JSON", 5), page.message()
    shown = page.frames()
    assert wait_for(lambda: page.frames() >= shown + 4, 5), "frames stopped after a bad message"
    driver.execute_script("window.streamgenPage.sendRaw(JSON.stringify({type: 'start', prompt: 'x', fps: 1000}))")
    assert wait_for(lambda: "fps: must be in [1, 60]" in page.message(), 5), page.message()
    assert page.el("message").get_attribute("class") == "error"
    shown = page.frames()
    assert wait_for(lambda: page.frames() >= shown + 4, 5), "frames stopped after an fps out of range"
    assert list(streams(server)) == [stream_id]
    page.click("stop")
    assert wait_for(lambda: freed(server), 2.0)


def test_the_camera_comes_back_restyled_within_the_budget(server, driver):
    page = Page(driver, url(server))
    accepted = server.service.metrics.input_frames.labels("accepted")._value.get()
    page.start(fps=FPS, mode="camera", prompt="a watercolor painting")
    assert wait_for(lambda: page.frames() >= 16, 40), page.message()
    assert page.el("input-view").is_displayed()  # the input shown beside the restyled output
    assert driver.execute_script("return document.getElementById('camera').readyState") >= 2
    (live,) = streams(server).values()
    assert live.video is not None  # a Transform stream: the video-to-video path
    assert server.service.metrics.input_frames.labels("accepted")._value.get() > accepted
    first = page.shot()
    time.sleep(1.0)
    assert page.shot() != first
    readings = [page.stats() for _ in range(4) if not time.sleep(0.5)]
    assert all(s["what"] == "from capture" and s["latency_ms"] is not None for s in readings), readings
    assert all(0 < s["latency_ms"] <= BUDGET_MS for s in readings), readings
    assert all(s["fps"] > FPS / 2 for s in readings), readings
    page.click("stop")
    assert wait_for(lambda: freed(server), 2.0)


def test_closing_the_tab_frees_the_stream_within_two_seconds(server, driver):
    home = driver.current_window_handle
    pages = len(server.service.web.pages)  # the first tab's page stays connected
    driver.switch_to.new_window("tab")
    page = Page(driver, url(server))
    page.start(fps=FPS, mode="camera")
    assert wait_for(lambda: page.frames() >= 4, 40), page.message()
    assert len(streams(server)) == 1 and len(server.service.web.pages) == pages + 1
    driver.close()
    closed = time.monotonic()
    driver.switch_to.window(home)
    assert wait_for(lambda: freed(server), 2.0), "the stream outlived its tab by 2 s"
    assert time.monotonic() - closed <= 2.0
    assert wait_for(lambda: len(server.service.web.pages) == pages, 2.0)
    assert server.service.metrics.web_pages._value.get() == pages


def test_with_tokens_no_token_starts_nothing_and_says_so(tmp_path, driver):
    tokens = write_tokens(tmp_path / "tokens.yaml", {"tok-page": ("pg", "client")})
    running = start(web_config(auth_tokens=str(tokens)))
    try:
        service = running.service
        page = Page(driver, service.web.address)
        assert page.el("token-row").is_displayed()  # the page asks for a token
        page.start(fps=FPS)
        assert wait_for(lambda: "needs a bearer token" in page.message(), 5), page.message()
        time.sleep(0.5)
        assert not service.servicer.streams and service.replicas[0].opened == 0
        assert service.metrics.stream_starts.labels("admitted")._value.get() == 0

        page.set("token", "tok-wrong")  # the guard decides, as for any gRPC call
        page.click("start")
        assert wait_for(lambda: "a valid bearer token is required" in page.message(), 5), page.message()
        assert service.metrics.auth_failures.labels("invalid")._value.get() == 1
        assert not service.servicer.streams and service.replicas[0].opened == 0

        page.set("token", "tok-page")
        page.click("start")
        assert wait_for(lambda: page.frames() >= 4, 30), page.message()
        (live,) = service.servicer.streams.values()
        assert live.tenant == "pg"  # the token's tenant owns the page's stream
        page.click("stop")
        assert wait_for(lambda: not service.servicer.streams, 2.0)
    finally:
        running.stop()
