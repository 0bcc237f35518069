"""``helpline demo``: the whole embedded conversation, run as a user would run it."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

import helpline.testing.demo
from conftest import PG_URL

# The demo embeds its own SQLite store whatever the environment says: the PostgreSQL pass would only
# run the same thing again.
pytestmark = pytest.mark.skipif(bool(PG_URL), reason="the demo embeds SQLite: tested in the SQLite pass")

DEMO = [sys.executable, "-m", "helpline.cli", "demo", "--port", "0"]
FINISHED = "scripted conversation finished"

# The hops the scripted conversation must show, in this order.
HOPS = [
    r"chatbot +-> helpline +POST /api/chat/ 201 created \(queued\)",
    r"helpline -> Amina +offer #\d+ \(ws\)",
    r"helpline -> Amina +offer #\d+ withdrawn \(timed out\)",
    r"helpline -> Baraka +offer #\d+ \(ws\)",
    r"Baraka +-> helpline +POST /api/offers/\d+/read 200 assigned",
    r"helpline -> RapidPro +flow_start event=assigned counselor=Baraka -> 201",
    r"helpline -> RapidPro +flow_start event=message text='Hello, I am Baraka.*' -> 201",
    r"chatbot +-> helpline +POST /api/chat/demo-\w+/ack/ delivered 200",
    r"chatbot +-> helpline +POST /api/chat/demo-\w+/ack/ read 200",
    r"chatbot +-> helpline +POST /api/chat/ 201 \(delivered\)",
    r"helpline -> Baraka +message 'Thank you.*' \(ws\)",
    r"helpline -> RapidPro +flow_start event=message part 1/2 \(\d+ chars\) -> 201",
    r"helpline -> RapidPro +flow_start event=message part 2/2 \(\d+ chars\) -> 201",
    r"chatbot +-> helpline +POST /api/chat/demo-\w+/close/ 200 closed",
    r"helpline -> Baraka +conversation_closed by chatbot \(ws\)",
    FINISHED,
    r"^demo stopped$",
]


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200")
    src = str(Path(helpline.testing.demo.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def assert_in_order(output: str, patterns: list[str]) -> None:
    lines = output.splitlines()
    at = 0
    for pattern in patterns:
        for i in range(at, len(lines)):
            if re.search(pattern, lines[i]):
                at = i + 1
                break
        else:
            raise AssertionError(f"no line matching {pattern!r} after line {at}:\n{output}")


def test_demo_shows_the_conversation_hop_by_hop_then_stops() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [*DEMO, "--seconds", "1"], capture_output=True, text=True, timeout=60, env=demo_env(), check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert_in_order(output, HOPS)

    assert re.search(r"API docs +http://127\.0\.0\.1:\d+/docs", output), output
    assert re.search(r"console +http://127\.0\.0\.1:\d+/console/", output), output
    assert "weni-demo" in output and "amina" in output and "baraka" in output and "supervisor" in output
    assert f"password       {helpline.testing.demo.DEMO_PASSWORD}" in output

    stamps = [int(m.group(1)) for m in re.finditer(r"^\+ *(\d+) ms  ", output, re.MULTILINE)]
    assert len(stamps) > 20 and stamps == sorted(stamps), output
    # The lapse is visible: the first offer lives about offer_timeout_s (the demo sees the offer when its
    # watcher next looks, a few hundred ms late on a busy machine, so the lower bound is loose).
    offer = re.search(r"^\+ *(\d+) ms  helpline -> Amina +offer #\d+ \(ws\)", output, re.MULTILINE)
    lapse = re.search(r"^\+ *(\d+) ms  helpline -> Amina +offer #\d+ withdrawn", output, re.MULTILINE)
    assert offer and lapse
    lived_s = (int(lapse.group(1)) - int(offer.group(1))) / 1000
    assert helpline.testing.demo.OFFER_TIMEOUT_S - 1.0 <= lived_s <= helpline.testing.demo.OFFER_TIMEOUT_S + 1.5, output
    assert time.monotonic() - started < 30


def test_ctrl_c_after_the_conversation_stops_everything_cleanly() -> None:
    proc = subprocess.Popen(
        [*DEMO, "--seconds", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_env(),
    )
    lines: list[str] = []
    finished = threading.Event()  # the script is over, or the output ended

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if FINISHED in line:
                finished.set()
        finished.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert finished.wait(45) and any(FINISHED in line for line in lines), "".join(lines)
        time.sleep(0.3)  # serving now
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    output = "".join(lines)
    assert code == 0, output
    assert output.rstrip().splitlines()[-1] == "demo stopped", output
    assert "Traceback" not in output and "Aborted" not in output, output


def run_in_process(port: int = 0) -> tuple[int, str]:
    out = io.StringIO()
    code = helpline.testing.demo.run_demo(port=port, seconds=0.1, console=Console(file=out, width=200, no_color=True))
    return code, out.getvalue()


def test_a_failing_step_is_reported_and_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helpline.testing.demo, "quiet_logs", lambda: None)
    monkeypatch.setattr(helpline.testing.demo, "FIRST_MESSAGE", "")  # the API rejects an empty message: 422
    code, output = run_in_process()
    assert code == 1, output
    assert re.search(r"chatbot +-> helpline +POST /api/chat/ 422", output), output
    assert "demo failed (the chatbot opens a high-risk conversation" in output, output
    assert "expected 201, got 422" in output, output
    assert output.rstrip().endswith("demo stopped (failed)"), output


def test_a_busy_port_is_reported_and_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helpline.testing.demo, "quiet_logs", lambda: None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, output = run_in_process(busy.getsockname()[1])
    assert code == 1, output
    assert "demo failed (starting)" in output and "in use" in output, output
