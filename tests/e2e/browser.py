"""Headless Debian Chromium driven over the DevTools protocol (for the UI test).

    with Chromium(tmp_path / "profile") as browser:
        browser.open("http://127.0.0.1:4200/runs")
        browser.wait_for_text(["Completed"])
        browser.screenshot(tmp_path / "runs.png")

The Prefect UI is a JavaScript app: pages are read once their rendered text holds what is
expected (`document.body.innerText`), polled, rather than from the first HTML.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1440,2200", "--remote-debugging-port=0"]


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (as CI and the test setup do)."""
    if not os.path.exists(CHROMIUM):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (root and Debian's package "
                                   f"archive are needed to install chromium):\n{out.stderr[-2000:]}")
    return CHROMIUM


class Chromium:
    """One headless browser with one page, closed on exit."""

    def __init__(self, profile_dir: Path, timeout: float = 60):
        self.profile_dir = Path(profile_dir)
        self.timeout = timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> "Chromium":
        from websockets.sync.client import connect

        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([ensure_chromium(), *FLAGS,
                                      f"--user-data-dir={self.profile_dir}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def call(self, method: str, **params) -> dict:
        """One DevTools command; events that arrive meanwhile are skipped."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=self.timeout))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout: float | None = None) -> str:
        """The page's text once it contains every needle; fails with what it shows instead."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, label: str) -> None:
        """Click the innermost visible element whose own text is `label` (tabs, links)."""
        found = self.evaluate(f"""(() => {{
            const els = [...document.querySelectorAll('body *')].filter(
                e => e.offsetParent !== null && e.innerText && e.innerText.trim() === {json.dumps(label)});
            const el = els[els.length - 1];
            if (!el) return false;
            el.click();
            return true;
        }})()""")
        if not found:
            raise AssertionError(f"no visible element labelled {label!r}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
