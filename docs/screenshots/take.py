"""Screenshots of a running Dagster UI with headless Chromium (Debian's `chromium`), driven over the DevTools
protocol so it can wait for the page and open the heatmap figure (a click on "[Show Markdown]").

    python docs/screenshots/take.py http://127.0.0.1:3000 <sweep id> docs/screenshots

Writes asset_graph.png (the zlt_sweep asset group), adapter_partitions.png (the partitions view of `adapter`, one
cell selected) and heatmap_asset.png (the `heatmap` asset's materialization for the sweep, figure opened).
Usually run through take.sh, which first produces a populated instance with the e2e test.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import websocket  # websocket-client (installed with the kubernetes client that dagster-k8s pulls in)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(base: str, query: str) -> dict:
    req = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class Page:
    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def cmd(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        return self.cmd("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {what}")
            time.sleep(0.5)

    def shot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.cmd("Page.captureScreenshot", format="png")["data"]))
        print(f"wrote {path}")


def _text(s: str) -> str:
    return f"document.body && document.body.innerText.includes({json.dumps(s)})"


def take(base: str, sweep_id: str, outdir: Path) -> None:
    base = base.rstrip("/")
    _gql(base, "mutation { setNuxSeen }")  # the "join the community" dialog shown on localhost
    location = _gql(base, "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }")[
        "data"]["workspaceOrError"]["locationEntries"][0]["name"]
    outdir.mkdir(parents=True, exist_ok=True)
    port, profile = _free_port(), tempfile.mkdtemp(prefix="zlt-chromium-")
    browser = subprocess.Popen(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                f"--remote-debugging-port={port}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    target = next(t for t in json.loads(r.read()) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        page = Page(websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60))
        page.cmd("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)

        page.cmd("Page.navigate", url=f"{base}/locations/{urllib.parse.quote(location)}/asset-groups/zlt_sweep")
        page.wait(_text("compiled_results") + " && " + _text("onpolicy_data"), "the asset graph")
        time.sleep(3)  # layout animation
        page.shot(outdir / "asset_graph.png")

        cell = urllib.parse.quote(f"lr=0.003_ep=3|{sweep_id}")  # the tiny grid's 2nd LR, 3 epochs
        page.cmd("Page.navigate", url=f"{base}/assets/adapter?view=partitions&partition={cell}")
        page.wait(_text("lr=0.1_ep=5") + " && " + _text("tokens_per_s"), "adapter's partitions and metadata")
        time.sleep(2)
        page.shot(outdir / "adapter_partitions.png")

        page.cmd("Page.navigate", url=f"{base}/assets/heatmap?view=partitions&partition={urllib.parse.quote(sweep_id)}")
        page.wait(_text("[Show Markdown]"), "the heatmap's metadata")
        page.js("[...document.querySelectorAll('*')].find(e => e.childElementCount === 0 && "
                "e.textContent.trim() === '[Show Markdown]').click()")
        page.wait("[...document.images].some(i => i.src.startsWith('data:image/png') && i.complete "
                  "&& i.naturalWidth > 0)", "the heatmap figure")
        # the dialog is narrower than the three-panel figure: zoom out so all three panels show
        page.cmd("Emulation.setDeviceMetricsOverride", width=2400, height=1500, deviceScaleFactor=0.667,
                 mobile=False)
        time.sleep(2)
        page.shot(outdir / "heatmap_asset.png")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    take(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
