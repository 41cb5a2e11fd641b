"""A headless Chromium driven over the DevTools protocol, for end-to-end tests of web pages; standard library only.

Chromium's `--remote-debugging-pipe` speaks the Chrome DevTools Protocol (JSON messages, each ended by a NUL byte)
over file descriptors 3 (commands in) and 4 (replies and events out), so no WebDriver, websocket library or browser
download is needed: Debian's `chromium` package is enough. Tests that use it skip when it is not installed.
"""
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

import pytest

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)


class ProtocolError(RuntimeError):
    pass


class Browser:
    """One headless browser with one page; `evaluate` runs JavaScript in it and returns the (JSON) value."""

    def __init__(self, timeout: float = 30.0):
        executable = find_browser()
        if executable is None:
            pytest.skip("no chromium installed (Debian: apt-get install -y chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()

        def connect_pipes():
            # In the child: put the pipe ends on the protocol's fixed descriptors 3 and 4. They are first moved above
            # both (a pipe end may itself be 3 or 4, and dup2 onto the same number would keep it close-on-exec).
            # os.pipe's descriptors are close-on-exec and dup2's copies are not, so exactly 3 and 4 reach chromium
            # (which is why close_fds is off: it would close them again).
            commands_in = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            replies_out = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(commands_in, 3)
            os.dup2(replies_out, 4)

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=connect_pipes, close_fds=False)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.buffer = b""
        self.next_id = 0
        target = self.command("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.command("Page.enable", session=True)
        self.command("Runtime.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.from_browser], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise ProtocolError("chromium closed the protocol pipe (did it crash?)")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def command(self, method: str, session: bool = False, **params) -> dict:
        """Send one protocol command (to the page's session when `session`) and return its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:  # events (no id) and other replies are not needed here
                if "error" in reply:
                    raise ProtocolError(f"{method}: {reply['error']}")
                return reply["result"]

    def navigate(self, url: str) -> None:
        self.command("Page.navigate", session=True, url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited); JS exceptions raise."""
        result = self.command("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                              returnByValue=True)
        if "exceptionDetails" in result:
            raise ProtocolError(f"{expression}: {result['exceptionDetails'].get('exception', result)}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        """Poll until the expression is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.05)

    def press_key(self, key: str, code: int) -> None:
        """A real key press (down and up) delivered to the focused page, e.g. ("ArrowLeft", 37)."""
        for kind in ("keyDown", "keyUp"):
            self.command("Input.dispatchKeyEvent", session=True, type=kind, key=key, code=key,
                         windowsVirtualKeyCode=code)

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element matching the CSS selector."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.command("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                         clickCount=1)

    def close(self) -> None:
        try:
            self.command("Browser.close")
        except (ProtocolError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)
