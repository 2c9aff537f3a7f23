"""A tiny Chrome DevTools Protocol client: open a page in headless Chromium; evaluate, hover, click, shoot.

Chromium starts with ``--remote-debugging-port=0``; the port is read from its stderr ("DevTools listening on
ws://..."), and one websocket (websocket-client) talks to the page's target.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def chromium() -> str | None:
    """The headless Chromium's path, or None where there is none."""
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def need_browser() -> str:
    """The browser's path; the test skips with a reason without one (fails with RESLENS_REQUIRE_BROWSER=1)."""
    found = chromium()
    missing = "no headless Chromium here (apt-get install chromium-headless-shell)" if found is None else None
    try:
        import websocket  # noqa: F401
    except ImportError:
        missing = "websocket-client is not installed (pip install websocket-client)"
    if missing:
        if os.environ.get("RESLENS_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return found


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, path: str, width: int = 1400, height: int = 900) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="reslens-chromium-")
        self.proc = subprocess.Popen(
            [path, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        url = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if "DevTools listening on" in line:
                url = line.split("listening on", 1)[1].strip()
                break
            if not line and self.proc.poll() is not None:
                break
        if url is None:
            self.close()
            raise RuntimeError("Chromium did not start its DevTools endpoint")
        port = url.split(":")[2].split("/")[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def open(self, path: Path, timeout: float = 30) -> None:
        """Open ``path`` and wait until the page's script has run (``window.reslensReady``)."""
        self.send("Page.navigate", url=Path(path).resolve().as_uri())
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval("window.reslensReady === true && document.readyState === 'complete'"):
                return
            time.sleep(0.05)
        text = self.eval("document.body.innerText.slice(0, 300)")
        raise TimeoutError(f"the page did not get ready: {text}")

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def centre(self, selector: str) -> tuple[float, float]:
        """The viewport centre of the first element matching ``selector`` (scrolled into view first)."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                        "e.scrollIntoView({block: 'center', inline: 'center'}); "
                        "const r = e.getBoundingClientRect(); "
                        "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        return box[0], box[1]

    def hover(self, selector: str) -> None:
        """Move the mouse onto the element (from the page's corner, so that it enters it afresh)."""
        x, y = self.centre(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=0, y=0)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, selector: str) -> None:
        x, y = self.centre(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def select(self, selector: str, value: str) -> None:
        """Choose ``value`` in the ``<select>`` at ``selector``, as a user would (a change event)."""
        self.eval(f"(() => {{ const s = document.querySelector({json.dumps(selector)}); s.value = "
                  f"{json.dumps(value)}; s.dispatchEvent(new Event('change')); }})()")

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        params = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
