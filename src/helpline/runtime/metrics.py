"""Prometheus metrics kept by this process: counters and histograms, and the gauges that
``helpline.api.ops`` fills from the store at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES_IN = Counter("helpline_messages_in", "Client messages received from chatbots", ["site"], registry=REGISTRY)
MESSAGES_OUT = Counter("helpline_messages_out", "Counselor messages written", ["site"], registry=REGISTRY)
OFFERS_MADE = Counter("helpline_offers_made", "Offers made to counselors", ["site"], registry=REGISTRY)
OFFERS_LAPSED = Counter("helpline_offers_lapsed", "Offers that timed out unread", ["site"], registry=REGISTRY)
OUTBOX_SENT = Counter("helpline_outbox_sent", "Outbox events delivered", ["site", "event"], registry=REGISTRY)
OUTBOX_RETRIES = Counter("helpline_outbox_retries", "Outbox delivery attempts to retry", ["site"], registry=REGISTRY)
OUTBOX_DEAD = Counter("helpline_outbox_dead_letters", "Outbox events dead-lettered", ["site"], registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "helpline_queue_wait_seconds",
    "From a conversation's arrival to a counselor reading its offer",
    ["site"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
INBOUND_BATCH = Histogram(
    "helpline_inbound_batch_messages",
    "Chatbot messages written per transaction (domain.inbound)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
INBOUND_BATCH_FAILED = Counter(
    "helpline_inbound_batches_failed",
    "Transactions of chatbot messages that failed as a whole; each message was then retried alone",
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge("helpline_outbox_depth", "Outbox events by status", ["status"], registry=REGISTRY)
OUTBOX_OLDEST = Gauge(
    "helpline_outbox_oldest_pending_age_seconds", "Age of the oldest pending event", registry=REGISTRY
)
CONVERSATIONS = Gauge(
    "helpline_conversations", "Open conversations by site and status", ["site", "status"], registry=REGISTRY
)
