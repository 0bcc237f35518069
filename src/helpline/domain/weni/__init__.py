"""Weni tickets (generic ticketer contract v1) mapped onto conversations and messages.

A ticket *is* a conversation: ``POST /v1/tickets`` creates one (queued for hunting like any other),
with ``chat_session`` = ``external_id`` = the conversation id and ``source`` = ``weni-ticketer``.
Weni's contact becomes the client (``contact.name`` the pseudo-name shown to counselors, URN and
UUID kept), its topic chooses the site, its priority the risk:

* site: the per-site path (``/sites/<slug>/v1/...``), else a topic whose name is a site's slug, name
  or country code, else the chatbot account's own site, else the default site;
* risk: ``low`` -> low, ``normal`` (Weni's default, and no priority) -> medium, ``high`` and
  ``urgent`` -> high.

The Weni project authenticates as a user of role ``chatbot`` (its ``api_token`` is that user's
long-lived token: ``helpline issuetoken``); one open ticket per contact and project. Repeats are
answered from the first answer: by ``Idempotency-Key`` and by ``X-Request-Id`` (per endpoint and
ticket), by ``ticket_id`` on open and by ``message_id`` on messages.

The package, by concern:

* :mod:`.tickets` — Weni -> helpline: open, message, close, reopen, history;
* :mod:`.requests` — a repeated request answered from the first answer (``TicketRequest``);
* :mod:`.webhooks` — helpline -> Weni: the bodies of the webhooks a counselor's reply, close and
  reopen become (:mod:`helpline.domain.outbox` decides a conversation is Weni's and queues them);
* :mod:`.agent` — a counselor reopening a ticket (the one counselor call only a ticket has);
* :mod:`.errors` — the contract's error codes.
"""
