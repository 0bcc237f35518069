"""What every benchmark needs: databases, users, a server process, client processes, results.

Layout of one run (all on loopback):

* the **orchestrator** (``python -m bench.<name>``): prepares the database, seeds users and
  tokens, hosts the fake RapidPro (a thread), starts and stops the other processes, reports;
* the **server** (``python -m bench.server``): uvicorn on ``helpline.app.create_app`` (or the
  bare baseline), configured like ``helpline serve``;
* **load generators** (``python -m bench.loadgen``) and **counselors**
  (``python -m bench.counselors``): separate processes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import platform
import queue
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / ".work"
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
PASSWORD = "bench-password-1"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/bench")
T = TypeVar("T")
SQLITE = "sqlite"
PG = "pg"


# --------------------------------------------------------------------------- small helpers


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_line(module: str) -> str:
    """The exact command that started this run, as typed from the project root."""
    return " ".join([".venv/bin/python", "-m", module, *map(shlex.quote, sys.argv[1:])])


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max (nearest rank) of ``values``."""
    if not values:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    xs = sorted(values)
    n = len(xs)

    def rank(p: float) -> float:
        return xs[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]

    return {
        "n": n,
        "mean": sum(xs) / n,
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": xs[-1],
    }


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory (``VmRSS``) and its peak (``VmHWM``) of a process, in MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuWindow:
    """The CPU processes spend from now on (together), per unit of work done."""

    def __init__(self, *pids: int | None) -> None:
        self.pids = [pid for pid in pids if pid is not None]
        self._cpu0, self._t0 = self._cpu(), time.monotonic()

    def _cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def cores(self) -> float:
        """How many cores, on average, since the window opened."""
        return (self._cpu() - self._cpu0) / (time.monotonic() - self._t0)

    def per_conversation(self, count: int) -> dict[str, float]:
        cpu, elapsed = self._cpu() - self._cpu0, time.monotonic() - self._t0
        return {"cpu_ms_per_conversation": 1000 * cpu / count, "cpu_busy": cpu / elapsed, "cpu_window_s": elapsed}


def python_speed_ms() -> float:
    """How fast this machine runs plain Python right now: a fixed loop (best of 5), in ms. Machines
    of the same kind differ (2-3x was seen between sessions): compare figures by this first."""
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts[:8]) - idle, sum(parts[:8])


class MachineCpu:
    """How busy the whole machine was between ``start()`` and ``busy()``, in cores."""

    def __init__(self) -> None:
        self._b0, self._t0 = _cpu_jiffies()

    def busy(self) -> float:
        b1, t1 = _cpu_jiffies()
        ncpu = os.cpu_count() or 1
        return ncpu * (b1 - self._b0) / max(1, t1 - self._t0)


def wait_quiet(max_wait: float, *, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) until other work leaves the machine mostly idle: less than
    ``threshold`` cores busy over 2 s. Returns the last figure, in cores."""
    deadline = time.monotonic() + max_wait
    while True:
        probe = MachineCpu()
        time.sleep(2.0)
        busy = probe.busy()
        if busy < threshold or time.monotonic() >= deadline:
            print(f"machine busy before the run: {busy:.2f} cores", flush=True)
            return busy
        print(f"machine busy with other work ({busy:.2f} cores); waiting...", flush=True)
        time.sleep(3.0)


def add_common_args(ap: Any) -> None:
    ap.add_argument("--quiet-wait", type=float, default=300.0, help="wait up to this for other work to calm down")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md and bench/results/")
    ap.add_argument(
        "--experiment",
        action="append",
        default=[],
        help="pass `--experiment NAME` to the helpline server (see bench.server); implies --no-write",
    )


def add_setup_args(ap: Any) -> None:
    """``--db`` and ``--hunter-process`` (benches of hunting: see ``setup_names``)."""
    ap.add_argument("--db", choices=["sqlite", "pg"], default="sqlite")
    ap.add_argument(
        "--hunter-process",
        action="store_true",
        help="PostgreSQL: hunt in `helpline work`, a process of its own (the server runs with run_hunter=false)",
    )
    ap.add_argument(
        "--outbox-process",
        action="store_true",
        help="PostgreSQL: deliver in `helpline work`, a process of its own (the server runs with run_outbox=false)",
    )


def setup_names(args: Any) -> tuple[str, str, str]:
    """(section name suffix, title words, row label) for ``--db``, ``--hunter-process`` and ``--outbox-process``."""
    apart = [loop for loop, on in (("hunter", args.hunter_process), ("outbox", args.outbox_process)) if on]
    if args.db == "sqlite":
        if apart:
            raise SystemExit("worker processes need --db pg: with SQLite, one process does everything")
        return "", "SQLite", "SQLite: "
    if not apart:
        return "-pg", "PostgreSQL", "PostgreSQL: "
    words = " and ".join(apart)
    where = "processes of their own" if len(apart) > 1 else "a process of its own"
    return "-pg-" + "-".join(apart) + "-process", f"PostgreSQL, {words} in {where}", f"PostgreSQL, {words} apart: "


def server_extra(args: Any) -> list[str]:
    """The helpline server's extra arguments for ``--experiment`` (which also turns writing off, as
    ``--outbox-process`` does: RESULTS.md has no section for it)."""
    if args.experiment or getattr(args, "outbox_process", False):
        args.no_write = True
    return [a for name in args.experiment for a in ("--experiment", name)]


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    free = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout.rstrip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": nproc,
        "cpu": cpu,
        "free_h": free,
        "kernel": platform.release(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "python_speed_ms": f"{python_speed_ms():.0f}",
    }


def fmt(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


# --------------------------------------------------------------------------- databases


def database_url(kind: str, name: str) -> str:
    """A fresh, empty database: a new SQLite file in ``bench/.work`` or the reset ``bench`` PG db."""
    WORK.mkdir(parents=True, exist_ok=True)
    if kind == SQLITE:
        path = WORK / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite+aiosqlite:///{path}"
    if kind == PG:
        if PG_URL.rstrip("/").rsplit("/", 1)[-1] == "test":
            raise SystemExit("refusing to use the `test` database: the test suite drops its schema")
        asyncio.run(_reset_pg(PG_URL))
        return PG_URL
    raise ValueError(f"unknown database kind {kind!r}")


async def _reset_pg(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- sites and users


def write_sites(
    path: Path,
    rapidpro_url: str,
    *,
    token: str,
    flow: str,
    strategy: str = "leastrecent",
    offer_timeout_s: float = 30.0,
    max_chats: int = 10,
    lapse_timeout_s: float = 1.0,
) -> Path:
    """Two sites: ``ke`` (the default; counselors read their offers) and ``lapse`` (short
    offers that are left to lapse, no auto-pause, no retry gap)."""
    path.write_text(
        textwrap.dedent(f"""
        [[site]]
        slug = "ke"
        name = "Childline Kenya"
        countries = ["KE"]
        timezone = "Africa/Nairobi"
        default = true
        [site.rapidpro]
        base_url = "{rapidpro_url}"
        token = "{token}"
        flow = "{flow}"
        urn_scheme = "telegram"
        [site.routing]
        strategy = "{strategy}"
        offer_timeout_s = {offer_timeout_s}
        max_chats_per_counselor = {max_chats}

        [[site]]
        slug = "lapse"
        name = "Lapse bench"
        countries = ["ZZ"]
        timezone = "UTC"
        [site.rapidpro]
        base_url = "{rapidpro_url}"
        token = "{token}"
        flow = "{flow}"
        urn_scheme = "telegram"
        [site.routing]
        strategy = "leastrecent"
        offer_timeout_s = {lapse_timeout_s}
        retry_gap_s = 0
        autopause_on_no_answer = false
        max_chats_per_counselor = 1000
        """),
        encoding="utf-8",
    )
    return path


@dataclass(frozen=True)
class BenchUser:
    username: str
    role: str
    site: str
    token: str = ""
    read: bool = True  # counselors: read their offers (False: let them lapse)
    id: int = 0


def seed_users(db_url: str, users: Iterable[BenchUser]) -> list[BenchUser]:
    """Create the schema, the users and one API token each, straight through the store.

    One argon2 hash is computed and shared (the password is the same); tokens are generated
    here and stored as their SHA-256, exactly as ``POST /api/token/`` would store them. This
    skips ~2 x 50 ms of argon2 per user, which matters for 1,000 counselors.
    """
    return asyncio.run(_seed_users(db_url, list(users)))


async def _seed_users(db_url: str, users: list[BenchUser]) -> list[BenchUser]:
    import secrets

    from sqlalchemy import insert, select

    from helpline.domain.auth import _hasher, hash_token
    from helpline.store.db import make_engine
    from helpline.store.migrate import upgrade
    from helpline.store.models import ApiToken, User

    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        password_hash = _hasher.hash(PASSWORD)
        t = time.time()
        out = [BenchUser(u.username, u.role, u.site, secrets.token_hex(20), u.read) for u in users]
        by_name: dict[str, int] = {}
        async with engine.begin() as conn:
            await conn.execute(
                insert(User),
                [
                    {
                        "username": u.username,
                        "password_hash": password_hash,
                        "role": u.role,
                        "site": u.site,
                        "name": u.username.title(),
                        "active": True,
                        "created_at": t,
                    }
                    for u in out
                ],
            )
            by_name = dict((await conn.execute(select(User.username, User.id))).all())
            await conn.execute(
                insert(ApiToken),
                [
                    {
                        "key_hash": hash_token(u.token),
                        "user_id": by_name[u.username],
                        "created_at": t,
                        "expires_at": t + 7 * 24 * 3600,
                    }
                    for u in out
                ],
            )
        return [BenchUser(u.username, u.role, u.site, u.token, u.read, by_name[u.username]) for u in out]
    finally:
        await engine.dispose()


def seed_assigned_conversations(
    db_url: str, *, chatbot_id: int, site: str, sessions: Sequence[str], counselor_ids: Sequence[int]
) -> None:
    """Open conversations already assigned (round robin over ``counselor_ids``), each with one
    delivered client message, inserted in bulk through the store (no hunting, no offers)."""
    asyncio.run(_seed_assigned(db_url, chatbot_id, site, list(sessions), list(counselor_ids)))


async def _seed_assigned(db_url: str, chatbot_id: int, site: str, sessions: list[str], staff: list[int]) -> None:
    import uuid

    from sqlalchemy import insert, text

    from helpline.store.db import make_engine
    from helpline.store.models import Conversation, Message

    engine = make_engine(db_url)
    t = time.time()
    convs: list[dict[str, Any]] = []
    msgs: list[dict[str, Any]] = []
    for i, session in enumerate(sessions):
        cid = str(uuid.uuid4())
        convs.append(
            {
                "id": cid,
                "site": site,
                "chatbot_id": chatbot_id,
                "chat_session": session,
                "source": "WENI",
                "client_id": str(100000 + i),
                "client_name": f"Client {i}",
                "contact_urn": f"telegram:{100000 + i}",
                "risk": "low",
                "risk_rank": 0,
                "status": "assigned",
                "counselor_id": staff[i % len(staff)],
                "created_at": t,
                "queued_at": t,
                "assigned_at": t,
            }
        )
        msgs.append(
            {
                "uuid": str(uuid.uuid4()),
                "conversation_id": cid,
                "direction": "in",
                "external_id": f"{session}-0",
                "text": f"hello from {session}",
                "status": "delivered",
                "created_at": t,
                "status_at": t,
            }
        )
    try:
        for start in range(0, len(convs), 5000):
            async with engine.begin() as conn:
                await conn.execute(insert(Conversation), convs[start : start + 5000])
                await conn.execute(insert(Message), msgs[start : start + 5000])
        if not db_url.startswith("sqlite"):
            # The statistics autovacuum gathers within a minute or so of a bulk load like this one
            # (the bench starts sooner): without them PostgreSQL guesses 2 conversations per site,
            # and reads all 10,000 where an index would read none (2 ms per new conversation).
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text("ANALYZE"))
    finally:
        await engine.dispose()


def counselors(prefix: str, n: int, site: str, *, read: bool = True) -> list[BenchUser]:
    return [BenchUser(f"{prefix}{i:04d}", "counselor", site, read=read) for i in range(n)]


CHATBOT = BenchUser("bench-bot", "chatbot", "*")


def write_users(path: Path, users: Sequence[BenchUser]) -> Path:
    path.write_text(json.dumps([asdict(u) for u in users]), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- processes


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class ServerProcess:
    """``python -m bench.server`` in its own process; ``start`` waits for ``/healthz``."""

    def __init__(
        self,
        *,
        app: str,
        db: str,
        sites: Path | None = None,
        log: Path,
        port: int | None = None,
        extra: Sequence[str] = (),
        hunter_process: bool = False,
        outbox_process: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.argv = [_python(), "-m", "bench.server", "--app", app, "--db", db, "--port", str(self.port), *extra]
        if sites is not None:
            self.argv += ["--sites", str(sites)]
        self.proc: subprocess.Popen[bytes] | None = None
        # ``hunter_process``, ``outbox_process``: the server leaves that loop to `helpline work` in a
        # process of its own (PostgreSQL), started once the server has upgraded the schema.
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._worker_envs: dict[str, dict[str, str]] = {}
        self._worker_argv = [_python(), "-m", "helpline.cli", "work", "--sites", str(sites)]
        for loop, apart in (("hunter", hunter_process), ("outbox", outbox_process)):
            if apart:
                assert sites is not None and not db.startswith("sqlite"), "worker processes need PostgreSQL"
                self.argv += ["--set", f"run_{loop}=false"]
                only = {"HELPLINE_RUN_HUNTER": str(loop == "hunter"), "HELPLINE_RUN_OUTBOX": str(loop == "outbox")}
                self._worker_envs[loop] = {**os.environ, "HELPLINE_DATABASE_URL": db, **only}

    @classmethod
    def helpline(
        cls, args: Any, *, name: str, kind: str, db: str, sites: Path, extra: Sequence[str] = ()
    ) -> ServerProcess:
        """Bench ``name``'s helpline server, as ``args`` ask: experiments, worker processes."""
        return cls(
            app="helpline",
            db=db,
            sites=sites,
            log=WORK / f"server-{name}-{kind}.log",
            extra=[*server_extra(args), *extra],
            hunter_process=getattr(args, "hunter_process", False),
            outbox_process=getattr(args, "outbox_process", False),
        )

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers.values()]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    for loop in self._worker_envs:
                        self._start_worker(loop)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer /healthz within {timeout}s; see {self.log}")

    def _start_worker(self, loop: str) -> None:
        log = self.log.with_name(f"{self.log.stem}-{loop}.log")
        with open(log, "wb") as out:
            worker = self.workers[loop] = subprocess.Popen(
                self._worker_argv, cwd=ROOT, env=self._worker_envs[loop], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while b"worker started" not in log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {loop} process did not start; see {log}")
            time.sleep(0.1)

    def stop(self) -> None:
        for worker in self.workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    worker.kill()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_loadgen(args: Sequence[str], out: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``python -m bench.loadgen ARGS --out OUT`` to completion and return its JSON."""
    out.unlink(missing_ok=True)
    proc = subprocess.run([_python(), "-m", "bench.loadgen", *args, "--out", str(out)], cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed with {proc.returncode}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def start_loadgen(args: Sequence[str], out: Path) -> subprocess.Popen[bytes]:
    out.unlink(missing_ok=True)
    return subprocess.Popen([_python(), "-m", "bench.loadgen", *args, "--out", str(out)], cwd=ROOT)


class Counselors:
    """``python -m bench.counselors``: counselor WebSockets in their own process, driven by
    JSON lines on its stdin; each command gets one JSON line back."""

    def __init__(self, url: str, users: Path, *, extra: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [_python(), "-m", "bench.counselors", "--url", url, "--users", str(users), *extra],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))

    def wait_line(self, timeout: float) -> dict[str, Any]:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no answer from the counselors process") from None

    def ready(self, timeout: float = 300.0) -> dict[str, Any]:
        line = self.wait_line(timeout)
        if line.get("event") != "ready":
            raise RuntimeError(f"counselors process: {line}")
        return line

    def ask(self, cmd: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        return self.wait_line(timeout)

    def wait_until(self, key: str, target: int, timeout: float, poll: float = 0.25) -> tuple[dict[str, Any], float]:
        """Poll ``status`` until ``status[key] >= target``; returns the status and seconds waited."""
        start = time.monotonic()
        while True:
            st = self.ask("status")
            if st[key] >= target:
                return st, time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"counselors: {key}={st[key]} < {target} after {timeout}s: {st}")
            time.sleep(poll)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit", timeout=10)
            except (TimeoutError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def settle_outbox(fake: Any, expected: int, timeout: float) -> tuple[float, int]:
    """Wait until the fake RapidPro has received ``expected`` requests in all (the outbox has
    drained what the setup queued); returns (seconds waited, requests still missing)."""
    t = time.monotonic()
    while len(fake.received) < expected and time.monotonic() - t < timeout:
        time.sleep(0.25)
    return time.monotonic() - t, max(0, expected - len(fake.received))


def start_fake_rapidpro() -> Any:
    from helpline.testing.fake_rapidpro import FakeRapidPro

    fake = FakeRapidPro()
    fake.start()
    return fake


# --------------------------------------------------------------------------- profiling


def py_spy() -> str:
    exe = ROOT / ".venv" / "bin" / "py-spy"
    return str(exe) if exe.exists() else "py-spy"


def start_profile(
    pid: int, seconds: float, out: Path, fmt_: str = "flamegraph", *, native: bool = False, gil: bool = False
) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``out`` (flamegraph svg or raw).

    Python stacks are sampled without pausing the process (``--nonblocking``); ``native`` adds
    the C frames (SQLite, uvloop, libc), which needs pausing it, and keeps idle threads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = "100" if native else "200"
    argv = [py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", rate]
    argv += ["--format", fmt_, "-o", str(out)]
    argv += ["--native"] if native else ["--nonblocking"]
    if gil:  # only samples holding the GIL: where the Python CPU goes
        argv += ["--gil"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    metric: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None  # None: no target, reported only
    note: str = ""


@dataclass
class Result:
    name: str
    title: str
    command: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    machine: dict[str, str] = field(default_factory=machine)

    def row(
        self,
        metric: str,
        value: float,
        unit: str,
        target: str = "",
        met: bool | None = None,
        note: str = "",
    ) -> None:
        self.rows.append(Row(metric, value, unit, target, met, note))


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("**met**" if met else "**not met**")


def render_table(rows: Sequence[Row]) -> str:
    lines = ["| metric | value | target | met? | note |", "| --- | ---: | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.metric} | {fmt(r.value)} {r.unit} | {r.target} | {_verdict(r.met)} | {r.note} |")
    return "\n".join(lines)


def render_section(res: Result) -> str:
    m = res.machine
    free = "\n".join("    " + line for line in m["free_h"].splitlines())
    speed = ""
    if "python_speed_ms" in m:
        speed = f"; speed: {m['python_speed_ms']} ms for a fixed Python loop (lower is faster)"
    parts = [
        f"## {res.title}",
        "",
        f"- date: {res.date}",
        f"- machine: {m['nproc']} cores (`nproc`), {m['cpu']}, Linux {m['kernel']}, Python {m['python']}{speed}",
        f"- other work on the machine: {m.get('busy_before', '?')} cores busy just before the run; load average"
        f" (1/5/15 min) at start {m.get('loadavg_start', '?')}, at end {m.get('loadavg_end', '?')}",
        "- `free -h`:",
        "",
        free,
        "",
        f"- command (from the project root): `{res.command}`",
        "",
        render_table(res.rows),
    ]
    if res.notes:
        parts += ["", *[f"- {n}" for n in res.notes]]
    return "\n".join(parts)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def _replace_section(text: str, name: str, body: str, *, before: str | None = None) -> str:
    start, end = _markers(name)
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    if before is not None:
        b_start, _ = _markers(before)
        if b_start in text:
            head, tail = text.split(b_start, 1)
            return head + block + "\n\n" + b_start + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


# Sections of RESULTS.md, in order; ``-pg``: the same bench run with ``--db pg``; ``-process``: with
# ``--hunter-process`` (and ``--outbox-process``).
ORDER = [
    "inbound",
    "hunting",
    "hunting-pg",
    "hunting-pg-hunter-process",
    "scale",
    "scale-pg",
    "scale-pg-hunter-process",
    "recovery",
    "recovery-pg",
]

HEADER = """# Benchmark results

Produced by the scripts in `bench/` (see `bench/README.md`). Each script rewrites its own section
below and the summary; everything outside the `<!-- bench:... -->` markers is kept as written.
Figures are from one run each; throughput targets are compared as ratios within one run because
this 2-core machine is noisy (the server, the load generator, the counselors' WebSockets,
PostgreSQL and the fake RapidPro all share the 2 cores).
"""


def write_result(res: Result) -> None:
    """Save ``bench/results/<name>.json`` and update ``bench/RESULTS.md`` (section + summary)."""
    res.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{res.name}.json").write_text(json.dumps(asdict(res), indent=2, default=str) + "\n")
    text = RESULTS_MD.read_text(encoding="utf-8") if RESULTS_MD.exists() else HEADER
    later = ORDER[ORDER.index(res.name) + 1 :] if res.name in ORDER else []
    before = next((name for name in later if _markers(name)[0] in text), None)  # a new section: in its place
    text = _replace_section(text, res.name, render_section(res), before=before)
    text = _replace_section(text, "summary", _render_summary(), before=ORDER[0])
    RESULTS_MD.write_text(text, encoding="utf-8")


def _render_summary() -> str:
    rows: list[str] = [
        "## Summary: targets",
        "",
        "| bench | metric | value | target | met? |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for name in ORDER:
        path = RESULTS_DIR / f"{name}.json"
        if not path.exists():
            rows.append(f"| {name} | (not run yet) | | | |")
            continue
        data = json.loads(path.read_text())
        for r in data["rows"]:
            if r["met"] is None:
                continue
            value = f"{fmt(r['value'])} {r['unit']}"
            rows.append(f"| {name} ({data['date']}) | {r['metric']} | {value} | {r['target']} | {_verdict(r['met'])} |")
    return "\n".join(rows)


def print_result(res: Result) -> None:
    """Print the table; everything measured also goes to ``bench/.work/<name>-last.json``, written or not."""
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{res.name}-last.json").write_text(json.dumps(asdict(res), indent=2, default=str) + "\n")
    print()
    print(f"== {res.title}  ({res.date}; Python speed {res.machine.get('python_speed_ms', '?')} ms)")
    width = max(len(r.metric) for r in res.rows) if res.rows else 10
    for r in res.rows:
        verdict = "" if r.met is None else ("MET" if r.met else "NOT MET")
        value = f"{fmt(r.value)} {r.unit}"
        print(f"  {r.metric:<{width}}  {value:>16}  {r.target:<14} {verdict:<8} {r.note}")
    for n in res.notes:
        print(f"  - {n}")
