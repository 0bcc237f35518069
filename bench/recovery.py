"""Recovery: RapidPro down while 100,000 outbox events pile up, then the drain when it returns.

    python -m bench.recovery             # 100,000 events over 1,000 conversations
    python -m bench.recovery --quick     # 10,000 events
    python -m bench.recovery --profile   # also py-spy the server during the drain

1. The fake RapidPro is started (to learn its port) and taken down: connections are refused.
2. The server starts (``bench.server``, like ``helpline serve``) with its outbox worker.
3. **Pile-up, directly through the store, in bulk** (not through counselor replies, which would
   take minutes at today's speed): ``--conversations`` assigned conversations, then
   ``--events`` counselor messages (``messages`` rows, ``pending``) and their outbox rows
   (``event=message``, payload built by ``helpline.delivery.rapidpro.build_flow_start`` exactly
   as ``domain.outbox.counselor_message`` builds it), interleaved over the conversations,
   inserted in chunks while the server runs: its worker keeps trying the head of each
   conversation and backs off.
4. After ``--outage`` more seconds, the fake comes back on the same port. Measured: time to
   the first accepted event, the last new one, and the drain rate (events / (last - return));
   the CPU the server used per event, the fake's per request, and how busy the whole machine was
   (other work shares the 2 cores: compare CPU per event across runs, not only rates).
5. Checks, over every event piled up (``--events``), from what the fake accepted: each
   conversation's events arrived in order (``seq`` 0, 1, 2, ...), each exactly once, none
   missing, nothing else; and in the store: every outbox row and every message ``sent``.

``--set KEY=VALUE`` passes a Settings override to the server (e.g. ``outbox_concurrency=64``) for
experiments; such runs are not written to RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import time
import uuid
from collections import defaultdict
from typing import Any

from bench.common import (
    CHATBOT,
    PG,
    SQLITE,
    WORK,
    MachineCpu,
    Result,
    ServerProcess,
    add_common_args,
    command_line,
    counselors,
    cpu_seconds,
    database_url,
    print_result,
    rss_mib,
    seed_users,
    start_fake_rapidpro,
    start_profile,
    wait_quiet,
    write_result,
    write_sites,
)
from bench.profile_report import report

TARGET_RATE = 1000.0


async def pile_up(db_url: str, sites_path: str, *, chatbot_id: int, counselor_id: int, n_conv: int, n_ev: int) -> float:
    """Insert the conversations, messages and outbox rows; returns the seconds it took."""
    from sqlalchemy import insert, select

    from helpline.config.sites import SiteRegistry
    from helpline.delivery.rapidpro import build_flow_start, contact_target
    from helpline.store.db import make_engine
    from helpline.store.models import Conversation, Message, OutboxEvent

    site = SiteRegistry.from_toml(sites_path).default
    engine = make_engine(db_url)
    t0 = time.monotonic()
    t = time.time()
    convs: list[dict[str, Any]] = [
        {
            "id": str(uuid.uuid4()),
            "site": site.slug,
            "chatbot_id": chatbot_id,
            "chat_session": f"rc-{i}",
            "source": "WENI",
            "client_id": str(200000 + i),
            "client_name": f"Client {i}",
            "contact_urn": f"telegram:{200000 + i}",
            "risk": "low",
            "risk_rank": 0,
            "status": "assigned",
            "counselor_id": counselor_id,
            "created_at": t,
            "queued_at": t,
            "assigned_at": t,
        }
        for i in range(n_conv)
    ]
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(Conversation), convs)
        seq = [0] * n_conv
        chunk = 1000  # short write transactions: the server's writer waits 250 ms at most for the lock
        for start in range(0, n_ev, chunk):
            rows = range(start, min(n_ev, start + chunk))
            t = time.time()
            msgs: list[dict[str, Any]] = []
            for k in rows:
                c = k % n_conv
                msgs.append(
                    {
                        "uuid": str(uuid.uuid4()),
                        "conversation_id": convs[c]["id"],
                        "direction": "out",
                        "external_id": f"rc-{c}-{seq[c]}",
                        "text": f"counselor message {seq[c]} of conversation {c}",
                        "status": "pending",
                        "counselor_id": counselor_id,
                        "created_at": t,
                        "status_at": t,
                    }
                )
                seq[c] += 1
            async with engine.begin() as conn:
                await conn.execute(insert(Message), msgs)
                ids: dict[str, int] = dict(
                    (
                        await conn.execute(
                            select(Message.external_id, Message.id).where(
                                Message.external_id.in_([m["external_id"] for m in msgs])
                            )
                        )
                    ).all()
                )
                events: list[dict[str, Any]] = []
                for m, k in zip(msgs, rows, strict=True):
                    conv = convs[k % n_conv]
                    target = contact_target(
                        site.rapidpro, contact_urn=conv["contact_urn"], contact_uuid=None, client_id=conv["client_id"]
                    )
                    params: dict[str, str] = {
                        "event": "message",
                        "conversation_id": conv["chat_session"],
                        "message_id": m["external_id"],
                        "text": m["text"],
                        "counselor_name": "Counselor",
                    }
                    events.append(
                        {
                            "conversation_id": conv["id"],
                            "site": site.slug,
                            "target": "rapidpro",
                            "event": "message",
                            "message_ref": ids[m["external_id"]],
                            "payload": json.dumps(build_flow_start(site.rapidpro, target, params), ensure_ascii=False),
                            "status": "pending",
                            "attempts": 0,
                            "next_attempt_at": t,
                            "claimed_until": 0.0,
                            "created_at": t,
                        }
                    )
                await conn.execute(insert(OutboxEvent), events)
        return time.monotonic() - t0
    finally:
        await engine.dispose()


async def store_state(db_url: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from helpline.store.db import make_engine
    from helpline.store.models import Message, OutboxEvent

    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            outbox = dict(
                (await conn.execute(select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status))).all()
            )
            messages = dict(
                (
                    await conn.execute(
                        select(Message.status, func.count()).where(Message.direction == "out").group_by(Message.status)
                    )
                ).all()
            )
            attempts = (
                await conn.execute(select(func.max(OutboxEvent.attempts), func.sum(OutboxEvent.attempts)))
            ).one()
        return {"outbox": outbox, "messages": messages, "max_attempts": attempts[0], "sum_attempts": attempts[1]}
    finally:
        await engine.dispose()


def expected_seqs(n_conv: int, n_ev: int) -> dict[str, int]:
    """How many events each conversation got in :func:`pile_up` (event ``k`` goes to ``k % n_conv``)."""
    return {f"rc-{c}": n_ev // n_conv + (1 if c < n_ev % n_conv else 0) for c in range(n_conv)}


def distinct(accepted: list[Any]) -> dict[str, float]:
    """Each event (``message_id``) accepted, with when it was first accepted."""
    first: dict[str, float] = {}
    for r in accepted:
        first.setdefault(str((r.params or {}).get("message_id", "")), r.at)
    return first


def check_delivery(accepted: list[Any], expected: dict[str, int]) -> dict[str, Any]:
    """Every (conversation, seq) that was piled up, against what the fake accepted: per conversation
    the seqs must arrive as 0, 1, 2, ... (order), each exactly once (duplicates), all of them
    (missing), and nothing else (unexpected)."""
    seqs: dict[str, list[int]] = defaultdict(list)
    unexpected = 0
    for r in accepted:
        p = r.params or {}
        conv, mid = str(p.get("conversation_id", "")), str(p.get("message_id", ""))
        if conv not in expected or not mid.startswith(conv + "-"):
            unexpected += 1
            continue
        seqs[conv].append(int(mid.rsplit("-", 1)[1]))
    out_of_order = duplicates = missing = 0
    for conv, n in expected.items():
        got = seqs.get(conv, [])
        distinct = set(got)
        duplicates += len(got) - len(distinct)
        missing += len(set(range(n)) - distinct)
        unexpected += len(distinct - set(range(n)))
        firsts = list(dict.fromkeys(got))  # first arrival of each seq
        if firsts != sorted(firsts) or firsts != list(range(len(firsts))):
            out_of_order += 1
    return {
        "conversations": len(expected),
        "conversations_seen": len(seqs),
        "events": sum(len(v) for v in seqs.values()),
        "expected": sum(expected.values()),
        "conversations_out_of_order_or_gap": out_of_order,
        "duplicates": duplicates,
        "missing": missing,
        "unexpected": unexpected,
    }


def profile_drain(pid: int, seconds: float) -> None:
    """py-spy during the drain: a flame graph, raw Python stacks, stacks holding the GIL, native."""
    svg = WORK.parent / "profile-recovery.svg"
    raw = WORK.parent / "profiles" / "recovery.txt"
    gil = WORK.parent / "profiles" / "recovery-gil.txt"
    native = WORK.parent / "profiles" / "recovery-native.txt"
    start_profile(pid, seconds, svg).wait()
    start_profile(pid, seconds, raw, "raw").wait()
    start_profile(pid, seconds, gil, "raw", gil=True).wait()
    start_profile(pid, seconds, native, "raw", native=True).wait()
    text = "\n\n".join(report(p) for p in (raw, gil, native))
    (raw.parent / "recovery-top.txt").write_text(text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "pg"], default="sqlite")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--conversations", type=int, default=1_000)
    ap.add_argument("--outage", type=float, default=5.0, help="seconds RapidPro stays down after the pile-up")
    ap.add_argument("--max-drain", type=float, default=150.0, help="give up waiting for the drain after this")
    ap.add_argument("--quick", action="store_true", help="10,000 events over 200 conversations")
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the server during the drain (its figures are not written)"
    )
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server Settings override, e.g. outbox_concurrency=128 (implies --no-write)",
    )
    add_common_args(ap)
    args = ap.parse_args()
    if args.set:
        args.no_write = True
    if args.quick:
        args.no_write = True  # smaller than the issue asks: not for RESULTS.md
        args.events, args.conversations = 10_000, 200
    if args.profile:
        args.no_write = True
    kind = SQLITE if args.db == "sqlite" else PG
    label = "SQLite: " if kind == SQLITE else "PostgreSQL: "

    res = Result(
        "recovery" if args.db == "sqlite" else "recovery-pg",
        f"5. Recovery: outbox drain after a RapidPro outage ({'SQLite' if args.db == 'sqlite' else 'PostgreSQL'})",
        command_line("bench.recovery"),
    )
    res.machine["busy_before"] = f"{wait_quiet(args.quiet_wait):.2f}"
    fake = start_fake_rapidpro()
    fake.go_down()
    d: dict[str, Any] = {}
    try:
        db = database_url(kind, "recovery")
        sites = write_sites(WORK / "sites-recovery.toml", fake.url, token=fake.token, flow=fake.flow)
        users = seed_users(db, [CHATBOT, *counselors("r", 1, "ke")])
        sets = [a for kv in args.set for a in ("--set", kv)]
        server = ServerProcess.helpline(args, name="recovery", kind=kind, db=db, sites=sites, extra=sets)
        with server as srv:
            d["pile_up_s"] = asyncio.run(
                pile_up(
                    db,
                    str(sites),
                    chatbot_id=users[0].id,
                    counselor_id=users[1].id,
                    n_conv=args.conversations,
                    n_ev=args.events,
                )
            )
            print(f"piled up {args.events} events in {d['pile_up_s']:.1f} s; outage goes on {args.outage:g} s")
            time.sleep(args.outage)
            d["before"] = asyncio.run(store_state(db))
            d["rss_before_mib"] = rss_mib(srv.pid)
            cpu0, own0, machine_cpu = cpu_seconds(srv.pid), cpu_seconds(os.getpid()), MachineCpu()
            back = time.monotonic()  # the drain is timed from here: includes the fake's own start-up
            fake.come_back()
            if args.profile:
                profile_drain(srv.pid, args.profile_seconds)
            while time.monotonic() - back < args.max_drain:
                time.sleep(0.25)
                # Cheap while the drain runs (this process's CPU counts as the fake's); then every
                # event must have been accepted once (a duplicate does not make up for a missing one).
                if len(fake.received) >= args.events and len(distinct(fake.accepted)) >= args.events:
                    break
            d["drain_wall_s"] = time.monotonic() - back
            d["server_cpu_s"] = cpu_seconds(srv.pid) - cpu0
            d["fake_cpu_s"] = cpu_seconds(os.getpid()) - own0  # the fake RapidPro is a thread of this process
            d["machine_cores_busy"] = machine_cpu.busy()
            d["server_cores"] = d["server_cpu_s"] / d["drain_wall_s"]
            d["rss_after_mib"] = rss_mib(srv.pid)
            # Anything still in flight (a duplicate would be) lands within a second; then the store.
            time.sleep(1.0)
            d["after"] = asyncio.run(store_state(db))
        accepted = fake.accepted
        received = fake.received
        d["received"] = len(received)
        d["accepted"] = len(accepted)
        d["refused"] = dict(collections.Counter(r.status for r in received if r.status != 201))
        d["check"] = check = check_delivery(accepted, expected_seqs(args.conversations, args.events))
        # The drain ends at the last *new* event accepted (a duplicate after it would not make it faster).
        seen = distinct(accepted)
        last_new = max(seen.values(), default=back)
        if accepted:
            first = accepted[0].at
            d["first_after_return_s"] = first - back
            d["last_after_return_s"] = last_new - back
            d["rate_from_return"] = len(seen) / (last_new - back)
            d["rate_steady"] = len(seen) / (last_new - first) if last_new > first else float("nan")
        else:
            d["first_after_return_s"] = d["last_after_return_s"] = d["rate_from_return"] = d["rate_steady"] = 0.0
        delivered = check["events"] - check["duplicates"]
        complete = check["missing"] == 0
        rate = d["rate_from_return"] if complete else delivered / d["drain_wall_s"]
        d["server_cpu_us_per_event"] = 1e6 * d["server_cpu_s"] / max(1, delivered)
        d["fake_cpu_us_per_request"] = 1e6 * d["fake_cpu_s"] / max(1, len(received))
        res.details = d
        res.row(
            f"{label}drain rate after RapidPro returns",
            rate,
            "events/s",
            "≥ 1,000/s",
            complete and rate >= TARGET_RATE,
            note=(
                f"{delivered:,} events in {d['last_after_return_s']:.1f} s"
                if complete
                else f"INCOMPLETE: {delivered:,} of {args.events:,} in {d['drain_wall_s']:.0f} s"
            ),
        )
        res.row(
            f"{label}steady drain rate (first -> last delivery)",
            d["rate_steady"],
            "events/s",
            note=f"first delivery {d['first_after_return_s']:.2f} s after the return",
        )
        res.row(
            f"{label}server CPU per event during the drain",
            d["server_cpu_us_per_event"],
            "µs",
            note=f"{d['server_cores']:.2f} cores over {d['drain_wall_s']:.1f} s; the fake RapidPro (a thread of the "
            f"orchestrator) {d['fake_cpu_us_per_request']:.0f} µs per request; whole machine "
            f"{d['machine_cores_busy']:.2f} of {os.cpu_count()} cores busy",
        )
        ok_order = check["conversations_out_of_order_or_gap"] == 0
        res.row(
            f"{label}order per conversation kept",
            check["conversations_out_of_order_or_gap"],
            "conversations out of order",
            "0",
            ok_order,
            note=f"{check['conversations_seen']:,} of {check['conversations']:,} conversations checked, "
            f"over the {delivered:,} events delivered",
        )
        after = d["after"]
        store = f"store after: outbox {after['outbox']}, messages {after['messages']}"
        store_ok = after["outbox"] == {"sent": args.events} and after["messages"] == {"sent": args.events}
        faults = check["duplicates"] + check["missing"] + check["unexpected"]
        res.row(
            f"{label}exactly once (nothing lost, no duplicate)",
            faults,
            "events lost, duplicated or unexpected",
            "0",
            complete and faults == 0 and store_ok,
            note=f"all {check['expected']:,} events checked: {check['duplicates']} duplicates, {check['missing']:,} "
            f"missing, {check['unexpected']} unexpected; requests not answered 201: {d['refused'] or 'none'}; "
            + store
            + ("" if complete else " (the drain did not finish)"),
        )
        res.row(
            f"{label}pile-up (bulk insert through the store)",
            args.events / d["pile_up_s"],
            "events/s",
            note=f"{args.events:,} events over {args.conversations:,} conversations in {d['pile_up_s']:.1f} s",
        )
        res.notes.append(
            f"Outage: connections refused during the pile-up and {args.outage:g} s more; attempts before the return: "
            f"max {d['before']['max_attempts']} per event, {d['before']['sum_attempts']} in all. Backoff is the "
            "server's default (base 0.5 s, cap 60 s, full jitter); once one head gets its 201, the outbox makes the "
            "other backed-off heads of that RapidPro due at once. The drain rate counts from the moment RapidPro "
            "listens again to the last new event accepted; exactly once and order are checked over every event "
            "piled up, from what the fake RapidPro accepted, and in the store (every outbox row and message `sent`)."
        )
    finally:
        fake.stop()
    print_result(res)
    if not args.no_write:
        write_result(res)


if __name__ == "__main__":
    main()
