#!/usr/bin/env python3
"""Enqueue mail into relayq from Python (redis-py) and follow its outcomes.

    pip install redis          # or: apt install python3-redis
    RELAYQ_REDIS=redis://127.0.0.1:6379/0 python3 enqueue.py user@example.net

The contract is lua/redis/README.md: one FCALL relayq_enqueue per message.
"""
import json
import os
import sys
import uuid
from email.message import EmailMessage
from email.policy import SMTP

import redis

QUEUE = "default"
# Every key of a queue starts with relayq:{<queue>}; the {hash tag} keeps
# them in one Redis Cluster slot. This prefix is the one key FCALL gets.
PREFIX = "relayq:{%s}" % QUEUE
EVENTS = PREFIX + ":events"

r = redis.Redis.from_url(os.environ.get("RELAYQ_REDIS", "redis://127.0.0.1:6379/0"))


class Rejected(Exception):
    """relayq refused the message (bad envelope or message); nothing was written."""


def enqueue(sender, rcpts, message, key=None, meta=None, delay=None):
    """Queue one message (bytes); return its id. Raises Rejected."""
    envelope = {"from": sender, "to": list(rcpts)}
    if key is not None:
        envelope["key"] = key        # same key again (within 24 h): same id, nothing queued
    if meta is not None:
        envelope["meta"] = meta      # any JSON object; comes back in every event
    if delay is not None:
        envelope["delay"] = delay    # seconds before the first attempt
    try:
        msg_id = r.fcall("relayq_enqueue", 1, PREFIX, json.dumps(envelope), message)
    except redis.ResponseError as e:
        # Redis sends "ERR relayq: <reason>"; redis-py strips the "ERR ",
        # so str(e) is "relayq: <reason>". Other errors (OOM, no such
        # function: the library is loaded by relayqd at start) pass through.
        if str(e).startswith("relayq: ") or str(e).startswith("ERR relayq: "):
            raise Rejected(str(e)) from None
        raise
    # A ConnectionError or TimeoutError here means "unknown whether it was
    # queued": calling enqueue() again with the same key is safe.
    return msg_id.decode()


def events(start_id):
    """Yield outcome events (dicts of str) after stream id start_id, forever.

    Keep the last id you handled (e.g. in your database) and start from it
    after a restart. The stream is capped (events_cap, default 100000), so
    a reader that stays away too long misses entries; `relayq show ID`
    still tells a message's state. Several workers sharing the work would
    use a consumer group (XGROUP CREATE / XREADGROUP / XACK) instead.
    """
    last = start_id
    while True:
        reply = r.xread({EVENTS: last}, count=100, block=5000)  # [] after 5 s of nothing
        for _stream, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                ev = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                # type: delivered | deferred | failed | expired | dropped | held
                # id, rcpt, code, enh, text, stage, attempt, next; "" = absent
                ev["meta"] = json.loads(ev.get("meta") or "{}")
                ev["stream_id"] = entry_id.decode()
                yield ev


def main():
    rcpt = sys.argv[1] if len(sys.argv) > 1 else "user@example.net"

    # Read the stream from its current end, taken before enqueueing so that
    # no event of our message can be missed ("$" on every call would be).
    newest = r.xrevrange(EVENTS, count=1)
    start = newest[0][0] if newest else "0-0"

    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = rcpt
    msg["Subject"] = "hello from relayq"
    msg.set_content("It works.\n")
    body = msg.as_bytes(policy=SMTP)          # RFC 5322 text, CRLF line ends

    # The idempotency key names the thing being sent, e.g. "welcome:user-42".
    key = "demo:" + str(uuid.uuid4())
    msg_id = enqueue("app@example.com", [rcpt], body, key=key, meta={"order": 42})
    again = enqueue("app@example.com", [rcpt], body, key=key, meta={"order": 42})
    print("queued", msg_id, "(same key again gives", again + ")")

    try:
        enqueue("app@example.com", ["no-at-sign"], body)
    except Rejected as e:
        print("rejected:", e)

    pending = {rcpt}
    for ev in events(start):
        if ev["id"] != msg_id:
            continue
        print(ev["type"], ev["rcpt"], ev["code"], ev["text"], "meta:", ev["meta"])
        if ev["type"] in ("delivered", "failed", "expired", "dropped"):
            pending.discard(ev["rcpt"])    # deferred means: will be retried
        if not pending:
            break


if __name__ == "__main__":
    main()
