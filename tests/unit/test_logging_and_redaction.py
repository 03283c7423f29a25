import json
import logging

from shared.observability import REQUEST_ID, JsonFormatter
from shared.redaction import redact


def test_json_lines_carry_the_request_id():
    formatter = JsonFormatter("dense")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "model %s failed", ("m",), None)
    token = REQUEST_ID.set("abc123")
    try:
        line = json.loads(formatter.format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "abc123" and line["message"] == "model m failed" and line["process"] == "dense"
    assert "request_id" not in json.loads(formatter.format(record))


def test_emails_phones_and_cards_are_redacted():
    text = "Mail jane.doe+work@example.co.uk or call +44 20 7946 0958; card 4111-1111-1111-1111. Thanks!"
    assert redact(text) == "Mail [EMAIL] or call [PHONE]; card [CARD]. Thanks!"


def test_ordinary_text_and_numbers_stay():
    for text in ("I love it 100%", "version 2 of 3", "order 12345 arrived on 2026-11-22"):
        assert redact(text) == text
