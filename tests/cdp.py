"""A headless chromium driven through the Chrome DevTools protocol over a pipe (--remote-debugging-pipe: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so no websocket library is needed. For tests/test_app.py
and the README screenshot; every wait is bounded."""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path


def find_chromium() -> str | None:
    """$NANOJAX_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH; None if none."""
    if os.environ.get("NANOJAX_CHROMIUM"):
        return os.environ["NANOJAX_CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    def __init__(self, binary: str, width: int = 1024, height: int = 768, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="nanojax-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [binary, "--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses to run its sandbox as root
        # posix_spawn, not fork (a forked JAX process may deadlock): chromium reads commands on fd 3, writes on fd 4
        devnull = os.open(os.devnull, os.O_RDWR)
        actions = [(os.POSIX_SPAWN_DUP2, to_chrome_r, 3), (os.POSIX_SPAWN_DUP2, from_chrome_w, 4),
                   (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                   (os.POSIX_SPAWN_DUP2, devnull, 2)]
        self.pid = os.posix_spawn(binary, args, dict(os.environ), file_actions=actions)
        os.close(devnull)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)

    def _read(self):
        buffer = b""
        while True:
            data = os.read(self._from_chrome, 65536)
            if not data:
                break
            buffer += data
            *messages, buffer = buffer.split(b"\0")
            for m in messages:
                msg = json.loads(m)
                if "id" in msg:
                    with self._cv:
                        self._replies[msg["id"]] = msg
                        self._cv.notify_all()
        with self._cv:
            self._replies[-1] = {"error": {"message": "chromium closed the pipe"}}
            self._cv.notify_all()

    def call(self, method: str, **params) -> dict:
        i = next(self._ids)
        msg = {"id": i, "method": method, "params": params}
        if self.session is not None:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while i not in self._replies and -1 not in self._replies:
                if not self._cv.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"chromium did not answer {method} in {self.timeout} s")
            reply = self._replies.pop(i, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def open(self, url: str):
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'")

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait(self, condition: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.eval(f"!!({condition})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout or self.timeout} s: {condition}")
            time.sleep(0.05)

    def type_and_send(self, text: str, clear: bool = True):
        """Type into the chat input like a person (focus, insert text, press Enter)."""
        self.eval("document.querySelector('#input').focus()" + (", document.querySelector('#input').value = ''"
                                                                  if clear else ""))
        if not clear:  # the caret to the end of what is there
            self.eval("(() => { const i = document.querySelector('#input'); i.selectionStart = i.selectionEnd = "
                      "i.value.length; })()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path) -> Path:
        path = Path(path)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        try:
            self.session = None
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        for _ in range(100):  # bounded: 10 s, then killed
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None):
    """python tests/cdp.py URL OUT.png MESSAGE...: open the chat page, send each message, wait for each reply, and save
    a screenshot (the README's picture: docs/serve-screenshot.png)."""
    url, out, *messages = argv if argv is not None else sys.argv[1:]
    binary = find_chromium()
    if binary is None:
        raise SystemExit("no chromium found (apt-get install chromium)")
    with Browser(binary, width=900, height=560) as page:
        page.open(url)
        for i, message in enumerate(messages, 1):
            page.type_and_send(message)
            page.wait(f"document.querySelectorAll('.assistant').length === {i} && "
                      f"!document.body.classList.contains('generating')", timeout=300)
        page.eval("document.querySelector('#scroller').scrollTop = 0")  # the conversation from its start
        page.screenshot(out)
    print(out)


if __name__ == "__main__":
    main()
