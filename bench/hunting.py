"""Hunting: queue -> offer on a counselor's WebSocket, and how punctually a lapsed offer is re-hunted.

    python -m bench.hunting            # 500 conversations, ~400 lapses, ~1 minute
    python -m bench.hunting --quick

1. **Queue -> offer.** ``--counselors`` counselors of site ``ke`` are connected and in the queue
   (they read every offer, so the conversation becomes assigned). The load generator posts
   ``--count`` new conversations at ``--rate`` per second. For each conversation: wall-clock
   arrival of its first ``offer`` on a WebSocket minus ``queued_at`` (the server's clock when
   the POST's transaction began; same machine, same clock). Split at the offer's ``created_at``,
   the time of the hunter's round once it holds the write lock: before it, the POST's
   transaction, the wake-up and the wait for the lock; after it, the hunter's transaction, the
   publication after its commit and the push to the WebSocket.
2. **Lapse precision.** Site ``lapse`` has ``offer_timeout_s = --lapse-timeout``, no auto-pause,
   no retry gap; its ``--lapse-counselors`` counselors never read. ``--lapse-count``
   conversations are posted spread over one timeout and left for ``--lapse-duration`` seconds:
   every offer lapses and is hunted again. For each lapse: arrival of ``offer_withdrawn``
   (``timed_out``) minus the offer's stored deadline, and arrival of the next offer of the same
   conversation minus that deadline. The target applies to the latter, for every lapse (max).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    CHATBOT,
    PG,
    SQLITE,
    WORK,
    Counselors,
    CpuWindow,
    Result,
    ServerProcess,
    add_common_args,
    add_setup_args,
    command_line,
    counselors,
    database_url,
    percentiles,
    print_result,
    run_loadgen,
    seed_users,
    settle_outbox,
    setup_names,
    start_fake_rapidpro,
    wait_quiet,
    write_result,
    write_sites,
    write_users,
)

TARGET_OFFER_P99_MS = 20.0
TARGET_LAPSE_MS = 100.0


def post_new(
    url: str, token: str, *, prefix: str, count: int, rate: float, path: str = "/api/chat/", conns: int = 8
) -> dict[str, Any]:
    lg = run_loadgen(
        [
            "new",
            "--url",
            url,
            "--token",
            token,
            "--prefix",
            prefix,
            "--count",
            str(count),
            "--rate",
            str(rate),
            "--path",
            path,
            "--conns",
            str(conns),
        ],
        WORK / f"loadgen-new-{prefix.strip('-')}.json",
    )
    bad = {k: v for k, v in lg["statuses"].items() if k != "201"}
    if bad:
        raise RuntimeError(f"posting {prefix}*: {lg['statuses']} e.g. {lg['records'][0]}")
    return lg


def dump(crowd: Counselors, name: str) -> dict[str, Any]:
    path = WORK / f"events-{name}.json"
    crowd.ask("dump", path=str(path))
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def offer_latencies(events: dict[str, Any], posted: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Per conversation: first offer's arrival minus queued_at (and minus the POST's send)."""
    sent = {r["session"]: r["sent"] for r in posted["records"]}
    first: dict[str, dict[str, Any]] = {}
    for o in events["offers"]:
        if not o["session"].startswith(prefix):
            continue
        if o["session"] not in first or o["arrived"] < first[o["session"]]["arrived"]:
            first[o["session"]] = o
    q = [(o["arrived"] - o["queued_at"]) * 1000 for o in first.values()]
    hunt = [(o["created_at"] - o["queued_at"]) * 1000 for o in first.values()]
    push = [(o["arrived"] - o["created_at"]) * 1000 for o in first.values()]
    post = [(o["arrived"] - sent[s]) * 1000 for s, o in first.items() if s in sent]
    return {
        "offered": len(first),
        "posted": len(sent),
        "queue_to_ws_ms": percentiles(q),
        "queue_to_offer_row_ms": percentiles(hunt),
        "offer_row_to_ws_ms": percentiles(push),
        "post_send_to_ws_ms": percentiles(post),
    }


def lapse_latencies(events: dict[str, Any], site: str = "lapse") -> dict[str, Any]:
    offers = {o["offer_id"]: o for o in events["offers"] if o["site"] == site}
    by_conv: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in offers.values():
        by_conv[o["conversation_id"]].append(o)
    for lst in by_conv.values():
        lst.sort(key=lambda o: o["created_at"])
    withdrawn_late: list[float] = []
    reoffer_late: list[float] = []
    reoffer_row_late: list[float] = []
    for w in events["withdrawn"]:
        o = offers.get(w["offer_id"])
        if o is None or w["reason"] != "timed_out":
            continue
        withdrawn_late.append((w["arrived"] - o["deadline"]) * 1000)
        later = [n for n in by_conv[o["conversation_id"]] if n["created_at"] > o["created_at"]]
        if later:
            reoffer_late.append((later[0]["arrived"] - o["deadline"]) * 1000)
            reoffer_row_late.append((later[0]["created_at"] - o["deadline"]) * 1000)
    return {
        "offers": len(offers),
        "lapses": len(withdrawn_late),
        "withdrawn_after_deadline_ms": percentiles(withdrawn_late),
        "reoffer_after_deadline_ms": percentiles(reoffer_late),
        "reoffer_row_after_deadline_ms": percentiles(reoffer_row_late),
    }


def add_rows(res: Result, label: str, offers: dict[str, Any], lapses: dict[str, Any]) -> None:
    q = offers["queue_to_ws_ms"]
    res.row(
        f"{label}queue -> offer on WS p50",
        q["p50"],
        "ms",
        note=f"{offers['offered']} of {offers['posted']} conversations offered",
    )
    res.row(
        f"{label}queue -> offer on WS p99",
        q["p99"],
        "ms",
        "p99 < 20 ms",
        q["p99"] < TARGET_OFFER_P99_MS,
        note=f"max {q['max']:.1f} ms; queued_at -> offer row (the POST's transaction, then the hunter's up to "
        f"its write lock) p99 {offers['queue_to_offer_row_ms']['p99']:.1f} ms, offer row -> WS (the hunter's "
        f"transaction, publish, push) p99 {offers['offer_row_to_ws_ms']['p99']:.1f} ms",
    )
    p = offers["post_send_to_ws_ms"]
    res.row(f"{label}POST sent -> offer on WS p99", p["p99"], "ms", note=f"p50 {p['p50']:.1f} ms")
    if "cpu_ms_per_conversation" in offers:
        res.row(
            f"{label}server CPU per new conversation",
            offers["cpu_ms_per_conversation"],
            "ms",
            note="its POST, hunt, offer, read and outbox events; server "
            f"{offers['cpu_busy']:.2f} cores busy over {offers['cpu_window_s']:.1f} s (compare runs by this)",
        )
    w = lapses["withdrawn_after_deadline_ms"]
    r = lapses["reoffer_after_deadline_ms"]
    res.row(
        f"{label}lapse: offer_withdrawn after deadline p99",
        w["p99"],
        "ms",
        note=f"p50 {w['p50']:.1f} ms, max {w['max']:.1f} ms, {lapses['lapses']} lapses",
    )
    res.row(
        f"{label}lapse: re-offer after deadline p50",
        r["p50"],
        "ms",
        note=f"offer row made p50 {lapses['reoffer_row_after_deadline_ms']['p50']:.1f} ms, "
        f"max {lapses['reoffer_row_after_deadline_ms']['max']:.1f} ms after the deadline",
    )
    res.row(f"{label}lapse: re-offer after deadline p99", r["p99"], "ms")
    res.row(
        f"{label}lapse: re-offer after deadline max",
        r["max"],
        "ms",
        "≤ 100 ms (every lapse)",
        r["max"] <= TARGET_LAPSE_MS,
        note=f"{r['n']} re-offers",
    )


def measure_lapses(
    crowd: Counselors, url: str, token: str, *, count: int, timeout: float, duration: float, prefix: str
) -> dict[str, Any]:
    crowd.ask("clear")
    post_new(url, token, prefix=prefix, count=count, rate=count / timeout, path="/sites/lapse/api/chat/")
    time.sleep(duration)
    return lapse_latencies(dump(crowd, f"lapse-{prefix.strip('-')}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--counselors", type=int, default=20)
    ap.add_argument("--max-chats", type=int, default=50)
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--rate", type=float, default=20.0, help="new conversations per second")
    ap.add_argument("--settle-timeout", type=float, default=60.0, help="wait for the outbox between the phases")
    ap.add_argument("--lapse-counselors", type=int, default=10)
    ap.add_argument("--lapse-count", type=int, default=40)
    ap.add_argument("--lapse-timeout", type=float, default=1.0)
    ap.add_argument("--lapse-duration", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true")
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.no_write = True  # smaller than the issue asks: not for RESULTS.md
        args.count, args.lapse_count, args.lapse_duration = 100, 20, 5.0
    kind = SQLITE if args.db == "sqlite" else PG
    suffix, setup, label = setup_names(args)

    res = Result(
        "hunting" + suffix,
        f"3. Hunting: queue -> offer, lapse -> re-hunt ({setup})",
        command_line("bench.hunting"),
    )
    res.machine["busy_before"] = f"{wait_quiet(args.quiet_wait):.2f}"
    fake = start_fake_rapidpro()
    try:
        db = database_url(kind, "hunting")
        sites = write_sites(
            WORK / "sites-hunting.toml",
            fake.url,
            token=fake.token,
            flow=fake.flow,
            max_chats=args.max_chats,
            lapse_timeout_s=args.lapse_timeout,
        )
        staff = counselors("k", args.counselors, "ke") + counselors("l", args.lapse_counselors, "lapse", read=False)
        users = seed_users(db, [CHATBOT, *staff])
        bot = users[0]
        users_file = write_users(WORK / "hunting-counselors.json", users[1:])
        server = ServerProcess.helpline(args, name="hunting", kind=kind, db=db, sites=sites)
        with server as srv:
            crowd = Counselors(srv.url, users_file)
            try:
                crowd.ready()
                cpu = CpuWindow(srv.pid, *srv.worker_pids)
                posted = post_new(srv.url, bot.token, prefix="h-", count=args.count, rate=args.rate)
                crowd.wait_until("offers", args.count, timeout=120)
                time.sleep(0.5)
                offers = offer_latencies(dump(crowd, "offers"), posted, "h-")
                # Each read offer queued "assigned" + "ack" for RapidPro: let that drain before the lapses.
                crowd.wait_until("reads_ok", args.count, timeout=120)
                settle_s, left = settle_outbox(fake, 2 * args.count, args.settle_timeout)
                offers.update(cpu.per_conversation(args.count))
                lapses = measure_lapses(
                    crowd,
                    srv.url,
                    bot.token,
                    count=args.lapse_count,
                    timeout=args.lapse_timeout,
                    duration=args.lapse_duration,
                    prefix="l-",
                )
                res.details = {
                    "offers": offers,
                    "lapses": lapses,
                    "status": crowd.ask("status"),
                    "outbox_settle_s": settle_s,
                    "outbox_left": left,
                }
            finally:
                crowd.stop()
        add_rows(res, label, offers, lapses)
        res.notes.append(
            f"Queue -> offer: {args.count} new conversations at {args.rate:g}/s (load generator process, 8 "
            f"connections), {args.counselors} counselors of `ke` (leastrecent, max {args.max_chats} chats) reading "
            "every offer; measured from the conversation's `queued_at` (server clock) to the offer's arrival in the "
            "counselors' process (same clock)."
        )
        res.notes.append(
            f"Lapse: {args.lapse_count} conversations on site `lapse` (offer_timeout_s={args.lapse_timeout:g}, "
            f"autopause off, retry_gap_s=0), {args.lapse_counselors} counselors who never read, "
            f"{args.lapse_duration:g} s; lateness = arrival on the WebSocket minus the offer's deadline. Before it, "
            f"the outbox drained the setup's events for {res.details['outbox_settle_s']:.0f} s"
            + (f" ({res.details['outbox_left']} still pending)." if res.details["outbox_left"] else ".")
        )
    finally:
        fake.stop()
    print_result(res)
    if not args.no_write:
        write_result(res)


if __name__ == "__main__":
    main()
