"""Opens a local page in headless Chromium over the DevTools protocol on a pipe (no websocket client needed).

Chromium's ``--remote-debugging-pipe`` reads JSON commands on file descriptor 3 and writes replies and
events on descriptor 4, each message ended by a NUL byte.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# every flag that keeps a headless Chromium off the network in a bare container
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


class BrowserError(RuntimeError):
    """Chromium is missing, or did not answer its first command: it cannot start here."""


class PageError(RuntimeError):
    """Chromium started, then failed or stopped answering."""


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _above_ten(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class _Pipe:
    def __init__(self, binary: str, profile: str, width: int, height: int):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child must see its pipe ends as descriptors 3 and 4: moved above 10 first, so no dup2 clobbers one
        to_chrome_r, from_chrome_w = (_above_ten(fd) for fd in (to_chrome_r, from_chrome_w))
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=lambda: (os.dup2(to_chrome_r, 3), os.dup2(from_chrome_w, 4)))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _read_message(self, timeout_s: float = 60.0) -> dict:
        import select

        while b"\0" not in self._buffer:
            if not select.select([self._from_chrome], [], [], timeout_s)[0]:
                raise PageError(f"chromium sent nothing for {timeout_s:g} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise PageError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Sends one command and returns its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self._to_chrome, json.dumps(command).encode() + b"\0")
        while True:
            message = self._read_message()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise PageError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        seen = next((e for e in self.events if e.get("method") == method), None)
        while seen is None:
            message = self._read_message()
            self.events.append(message)
            seen = message if message.get("method") == method else None
        return seen

    def close(self):
        try:
            self.send("Browser.close")
        except (PageError, OSError):
            pass
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# every element of the live DOM that could run code, after the page loaded
ACTIVE = """[...document.querySelectorAll('*')].flatMap(e => {
  const tag = e.tagName.toLowerCase();
  const found = ['script', 'iframe', 'object', 'embed', 'frame', 'base', 'form'].includes(tag) ? [tag] : [];
  for (const a of e.attributes) {
    const value = a.value.replace(/[\\s\\x00-\\x1f]/g, '').toLowerCase();
    if (a.name.toLowerCase().startsWith('on') || value.startsWith('javascript:') || value.startsWith('vbscript:')
        || (value.startsWith('data:') && !value.startsWith('data:image/svg+xml;base64,')))
      found.push(tag + '@' + a.name);
  }
  return found;
})"""


def open_page(path, *, width: int = 1100, height: int = 900, full_page: bool = True,
              script: str = "[...document.querySelectorAll('section[id]')].map(s => s.id)") -> dict:
    """Loads ``path`` and returns what a person would see and what went wrong.

    Returns:
        {"requests": every URL requested, "failed": failed requests, "errors": script errors and
        console errors, "value": the result of ``script`` after load, "png": the screenshot bytes,
        "dialogs": the messages of alert/confirm/prompt dialogs the page opened, "active": what in the
        live DOM could run code: each <script>, <iframe>, <object>, <embed> element, each on* attribute
        and each javascript: URL, as "tag" or "tag@attribute"}.
    """
    binary = find_chromium()
    if binary is None:
        raise BrowserError("no chromium on PATH (Debian: apt-get install -y chromium)")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="asr-onnx-chromium-") as profile:
        browser = _Pipe(binary, profile, width, height)
        try:
            try:
                target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            except PageError as e:
                raise BrowserError(f"chromium did not start: {e}") from None
            session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                browser.send(f"{domain}.enable", session)
            browser.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                         deviceScaleFactor=1, mobile=False)
            browser.send("Page.navigate", session, url=url)
            browser.wait_for("Page.loadEventFired")
            value = browser.send("Runtime.evaluate", session, expression=script, returnByValue=True)
            active = browser.send("Runtime.evaluate", session, expression=ACTIVE, returnByValue=True)
            shot = browser.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=full_page)
        finally:
            browser.close()
    events = [e for e in browser.events if e.get("sessionId") == session]
    params = [(e["method"], e.get("params", {})) for e in events]
    errors = [p["exceptionDetails"].get("text", "") + " " + str(p["exceptionDetails"].get("exception", {})
                                                                  .get("description", ""))
              for m, p in params if m == "Runtime.exceptionThrown"]
    errors += [p["entry"]["text"] for m, p in params if m == "Log.entryAdded" and p["entry"]["level"] == "error"]
    errors += [str(p.get("args")) for m, p in params if m == "Runtime.consoleAPICalled" and p["type"] == "error"]
    return {
        "requests": [p["request"]["url"] for m, p in params if m == "Network.requestWillBeSent"],
        "failed": [p for m, p in params if m == "Network.loadingFailed"],
        "errors": errors,
        "value": value.get("result", {}).get("value"),
        "png": base64.b64decode(shot["data"]),
        "dialogs": [p.get("message") for m, p in params if m == "Page.javascriptDialogOpening"],
        "active": active.get("result", {}).get("value"),
    }
