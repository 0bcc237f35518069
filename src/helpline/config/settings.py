"""Process settings, from ``HELPLINE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WeniProject(BaseModel):
    """Per Weni project (keyed by its chatbot username) overrides of the ``weni_*`` settings."""

    webhook_secrets: str = ""
    webhook_base_url: str = ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HELPLINE_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./helpline.db"
    sites: str = "sites.toml"

    token_ttl_s: int = Field(24 * 3600, gt=0)
    max_body_bytes: int = Field(1024 * 1024, gt=0)

    # Login rate limit: at most `login_max_failures` failed attempts per username (and per client
    # address) within `login_window_s`; then 429 with Retry-After until the window has passed.
    login_max_failures: int = Field(5, gt=0)
    login_window_s: float = Field(300.0, gt=0)
    # Signed requests (chatbot accounts with a signing secret): how far X-Helpline-Timestamp may be
    # from the server's clock, either way; a signature is also refused a second time within it.
    signature_tolerance_s: float = Field(300.0, gt=0)

    # Outbox delivery.
    # Events in flight at once (claimed, sent, not yet recorded), each of another conversation; the
    # default RapidPro/Weni clients keep up to 256 connections per peer.
    outbox_concurrency: int = Field(128, gt=0)
    outbox_backoff_base_s: float = Field(0.5, gt=0)
    outbox_backoff_cap_s: float = Field(60.0, gt=0)
    outbox_max_attempts: int = Field(0, ge=0)  # 0: retry retryable failures for ever
    # A claimed event is another instance's to retry once its claim is this old (the claimer died).
    # Keep it above the longest peer timeout (RapidPro's timeout_s, weni_timeout_s).
    outbox_lease_s: float = Field(60.0, gt=0)

    # Which loops this instance runs besides its HTTP server. On PostgreSQL instances share them, so
    # an instance may leave one to others: e.g. `helpline serve` with HELPLINE_RUN_HUNTER=false and
    # `helpline work` with HELPLINE_RUN_OUTBOX=false, a hunter in a process of its own. With SQLite,
    # keep both on (one process does everything).
    run_hunter: bool = True
    run_outbox: bool = True

    # How often background loops look at the store even when nobody woke them (safety net).
    poll_interval_s: float = Field(1.0, gt=0)

    log_level: str = "INFO"
    # Garbage collection (helpline.runtime.gcpolicy): after startup, gc.freeze() the long-lived objects;
    # full collections every gc_full_collection_s (0: whenever Python decides, i.e. under load,
    # ~100 ms pauses of the event loop that were the tail of the message latency).
    gc_freeze: bool = True
    gc_full_collection_s: float = Field(600.0, ge=0)

    # Weni generic ticketer (``/v1/tickets``; webhooks back signed with HMAC-SHA256).
    # "new,old": the first secret signs; when Weni answers 401 invalid_signature the next is tried,
    # so a rotation needs no downtime whichever side changes first.
    weni_webhook_secrets: str = ""
    # Where webhooks go when Weni sends no ``metadata.webhook_base_url`` (a configured URL wins).
    weni_webhook_base_url: str = ""
    # Per project, keyed by the chatbot username whose token the Weni project uses (JSON in the env).
    weni_projects: dict[str, WeniProject] = Field(default_factory=dict)
    weni_timeout_s: float = Field(30.0, gt=0)
    # Attachments (URL references): size limit, and the content types a counselor may send.
    attachment_max_bytes: int = Field(10 * 1024 * 1024, gt=0)
    attachment_content_types: str = "image/*,audio/*,video/*,application/pdf,text/plain"

    # Child-data protection. Closed conversations older than this many days lose their texts,
    # attachments and client identifiers (anonymous statistics stay); 0 keeps everything for ever.
    retention_days: int = Field(0, ge=0)
    # How often each instance runs the purge (PostgreSQL: instances share the work safely).
    retention_interval_s: float = Field(86400.0, gt=0)
    # Browser origins allowed to call the API cross-origin ("https://a.example,https://b.example");
    # empty: none (the console is served by the app itself and needs no CORS).
    cors_origins: str = ""
