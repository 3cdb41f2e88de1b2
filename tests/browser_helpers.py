"""Open an HTML file in headless Chromium and read back what a person would see.

A small Chrome DevTools Protocol (CDP) client over ``--remote-debugging-pipe`` (the browser
reads commands on fd 3 and writes replies and events on fd 4, each a JSON message ended by a
NUL byte): no websocket library, no port, nothing but the standard library. ``find_chromium``
returns None where no browser is installed, and the tests skip with that reason.

What ``Browser.open`` reports for a page, after its load event and two animation frames:

* ``errors``: console errors (``Runtime.consoleAPICalled`` of type error/assert), uncaught
  exceptions (``Runtime.exceptionThrown``) and browser log entries of level error
  (``Log.entryAdded``: failed loads, CSP and security errors);
* ``images``: every ``<img>`` with ``complete``, ``naturalWidth`` and the first characters of
  its ``src`` (an image whose data does not decode has ``naturalWidth == 0``);
* ``text``: ``document.body.innerText`` with every ``<details>`` opened first (rendered text:
  what is hidden by CSS is not in it).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """``$SAFELM_CHROMIUM`` if set (empty: none), else the first Chromium on PATH."""
    env = os.environ.get("SAFELM_CHROMIUM")
    if env is not None:
        return shutil.which(env) if env else None
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""

    def broken_images(self) -> list[dict[str, Any]]:
        return [i for i in self.images if not (i["complete"] and i["naturalWidth"] > 0)]


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium; ``open(path)`` loads a file in a fresh tab and reports on it."""

    def __init__(self, binary: str, timeout: float = 30.0):
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="safelm-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends on fds 3 and 4, where CDP wants them
            # (first above 10, so that neither dup2 overwrites the other end)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child_r, from_child_w)]
            os.dup2(high[0], 3)  # inheritable: survive the exec
            os.dup2(high[1], 4)

        args = [binary, "--headless=new", "--remote-debugging-pipe", "--no-first-run",
                "--no-default-browser-check", f"--user-data-dir={self._profile}",
                "--disable-gpu", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--mute-audio",
                "--disable-dev-shm-usage", "about:blank"]  # /tmp, not a small /dev/shm
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # close_fds=False: Popen would close fds 3 and 4 after preexec_fn; Python's own fds are
        # not inheritable (PEP 446), so nothing else leaks into the browser
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False,
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._id = 0
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr),
                                        daemon=True)
        self._reader.start()
        try:
            self.version = self.call("Browser.getVersion")["product"]
        except (CDPError, OSError) as e:
            self.close()
            self._reader.join(timeout=5)
            err = b"".join(self._stderr).decode(errors="replace").strip()
            raise CDPError(f"{binary} exited with status {self.proc.returncode} before the "
                           f"DevTools handshake: {err[-300:] or 'no output'}") from e

    # ---- the protocol ----------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("no reply from Chromium in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise CDPError("Chromium closed the pipe: "
                                   + b"".join(self._stderr).decode(errors="replace")[-2000:])
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data):]
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _wait_event(self, method: str, session: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for e in self._events:
                if e.get("method") == method and e.get("sessionId") == session:
                    return e
            self._events.append(self._read_message(deadline))

    def evaluate(self, expression: str, session: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, session)
        if "exceptionDetails" in res:
            raise CDPError(f"{expression[:60]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    # ---- one page --------------------------------------------------------------------------
    def open(self, path: str | Path) -> PageResult:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}
                            )["sessionId"]
        try:
            self._events.clear()
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable", session=session)
            self.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
            self._wait_event("Page.loadEventFired", session)
            # rendered: two animation frames after load (layout and paint done)
            self.evaluate("new Promise(r => requestAnimationFrame(() => "
                          "requestAnimationFrame(() => r(true))))", session)
            images = self.evaluate(
                "Array.from(document.images, i => ({complete: i.complete, naturalWidth: "
                "i.naturalWidth, src: (i.getAttribute('src') || '').slice(0, 40)}))", session)
            text = self.evaluate("document.querySelectorAll('details').forEach(d => "
                                 "d.open = true); document.body.innerText", session)
            self.evaluate("0", session)  # a last round trip: late events are in by now
            return PageResult(errors=self._errors(session), images=images, text=text)
        finally:
            self.call("Target.closeTarget", {"targetId": target})

    def _errors(self, session: str) -> list[str]:
        out = []
        for e in self._events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description")
                                               or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)
