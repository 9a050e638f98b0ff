"""Helpers for the browser page's tests: a service with the page on (the tiny model, one in-process stage, no
Ray), and headless Chromium driving it (Debian's chromium and chromium-driver, through selenium)."""

from __future__ import annotations

import re
import shutil
import time

from orchestrator.config import CacheConfig, GenerationConfig, ParallelConfig, SamplerConfig, ServerConfig, \
    ServiceConfig, get_config

FPS = 8
BUDGET_MS = 4000
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = None if CHROMIUM and CHROMEDRIVER else (
    "headless Chromium is not installed: `make test` installs Debian's chromium and chromium-driver where it runs as "
    "root with apt (elsewhere: apt-get install chromium chromium-driver)")


def web_config(**server) -> ServiceConfig:
    """Chunks of one latent frame (less input buffering for the camera), the page on a free loopback port."""
    gen = GenerationConfig(model=get_config("tiny"), sampler=SamplerConfig(chunk_frames=1), cache=CacheConfig())
    base = dict(listen="127.0.0.1:0", metrics_listen="", web_listen="127.0.0.1:0", probe_period_s=0,
                max_streams_per_replica=4, default_latency_budget_ms=BUDGET_MS, idle_timeout_s=5.0)
    return ServiceConfig(generation=gen, server=ServerConfig(**{**base, **server}),
                         parallel=ParallelConfig(stages=1, backend="local"))


def wait_for(predicate, timeout: float, period: float = 0.05):
    """The predicate's first truthy value within ``timeout`` seconds (else its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(period)


def chromium(window: str = "1200,900"):
    """Headless Chromium with a fake camera that needs no permission prompt."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--window-size={window}", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                "--no-proxy-server", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


STATS = re.compile(r"delivered (?P<fps>[\d.]+) fps · latency (?P<latency>\d+|–) ?m?s? "
                   r"(?P<what>from capture|behind due|ahead of due)"
                   r" · deadline misses (?P<misses>\d+) · revision (?P<revision>\d+|–) · dropped (?P<dropped>\d+)")


class Page:
    """The page in one tab, read as a person reads it: its message line, its stats line, its video area."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        assert wait_for(lambda: self.text("connection") == "connected", 15), self.text("connection")

    def el(self, element_id: str):
        return self.driver.find_element(self.by.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.el(element_id).text

    def set(self, element_id: str, value) -> None:
        field = self.el(element_id)
        if field.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(field).select_by_value(str(value))
            return
        field.clear()
        field.send_keys(str(value))

    def click(self, element_id: str) -> None:
        self.el(element_id).click()

    def message(self) -> str:
        return self.text("message")

    def stats(self) -> dict:
        m = STATS.search(self.text("stats"))
        assert m, self.text("stats")
        d = m.groupdict()
        sign = -1 if d["what"] == "ahead of due" else 1
        return {"fps": float(d["fps"]), "latency_ms": None if d["latency"] == "–" else sign * int(d["latency"]),
                "what": d["what"], "misses": int(d["misses"]),
                "revision": None if d["revision"] == "–" else int(d["revision"]), "dropped": int(d["dropped"])}

    def frames(self) -> int:
        return int(self.el("stats").get_attribute("data-frames") or 0)

    def shot(self) -> bytes:
        """A screenshot of the video area."""
        return self.el("video").screenshot_as_png

    def start(self, fps: float = FPS, mode: str = "text", prompt: str | None = None) -> None:
        self.set("mode", mode)
        self.set("fps", fps)
        if prompt is not None:
            self.set("prompt", prompt)
        self.click("start")
