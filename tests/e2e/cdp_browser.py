"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol with websocket-client (which
the kubernetes client of dagster-k8s installs): no browser download, no extra Python package.

    with Browser(width=1600, height=1000) as page:
        page.goto(url); page.wait("document.title", "a title"); page.shot(Path("x.png"))
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from loopback import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars=false",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--force-device-scale-factor=1"]


def chromium_binary() -> str | None:
    """The first Chromium on PATH, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class Page:
    """One tab: commands, JavaScript evaluation, waiting for a condition, screenshots."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def cmd(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        """The value of a JavaScript expression (JSON-able), awaiting a promise; raises on a JS exception."""
        res = self.cmd("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {res['exceptionDetails'].get('exception', {})}")
        return res["result"].get("value")

    def goto(self, url: str) -> None:
        self.cmd("Page.navigate", url=url)

    def wait(self, expression: str, what: str, timeout: float = 60):
        """Poll a JavaScript expression until it is truthy; TimeoutError naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is between documents
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {what}")
            time.sleep(0.5)

    def text(self, s: str) -> str:
        """JavaScript: the page's visible text contains `s`."""
        return f"document.body && document.body.innerText.includes({json.dumps(s)})"

    def shot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.cmd("Page.captureScreenshot", format="png")["data"]))
        return path


class Browser:
    """A headless Chromium with one page of `width` x `height` CSS pixels at 100% zoom (device scale 1)."""

    def __init__(self, width: int = 1600, height: int = 1000, binary: str | None = None):
        self.binary = binary or chromium_binary()
        if self.binary is None:
            raise FileNotFoundError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
        self.width, self.height = width, height

    def __enter__(self) -> Page:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="zlt-chromium-")
        port = free_port()
        self.proc = subprocess.Popen([self.binary, *FLAGS, f"--window-size={self.width},{self.height}",
                                      f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    target = next(t for t in json.loads(r.read()) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"{self.binary} did not open its DevTools port {port}")
                time.sleep(0.5)
        self.page = Page(websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60))
        self.page.cmd("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        return self.page

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
