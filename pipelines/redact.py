"""Credentials out of logs and records: option values and text that look like tokens, keys
or passwords become ``<redacted>``. Used for the run manifest's options (and the artifact
options it copies), for every log record the CLI emits, and for its error messages."""

from __future__ import annotations

import re

REDACTED = "<redacted>"

_SECRET_WORDS = (r"(?:token|secret|passw(?:or)?d|credential|api_?key|access_?key|"
                 r"private_?key|auth_?key|connection_?string|signature)")
_SECRET_NAME = re.compile(_SECRET_WORDS, re.I)
_SECRET_VALUE = [  # (pattern, replacement)
    (re.compile(r"ya29\.[0-9A-Za-z_\-.]+"), REDACTED),                          # Google OAuth
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),                   # AWS key id
    (re.compile(r"\bgh[pousr]_[0-9A-Za-z]{20,}\b"), REDACTED),                  # GitHub
    (re.compile(r"\bxox[abprs]-[0-9A-Za-z-]{10,}\b"), REDACTED),                # Slack
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"), REDACTED),                       # Google API key
    (re.compile(r"\beyJ[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]*"), REDACTED),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE "
                r"KEY-----|$)"), REDACTED),
    (re.compile(r"(://[^/@\s:]+:)[^/@\s]+(@)"), r"\1" + REDACTED + r"\2"),   # user:pw@host
    (re.compile(r"(?i)([?&](?:[\w-]*token|sig|signature|key|x-goog-signature|x-goog-credential"
                r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"]+"),
     r"\1" + REDACTED),                                                      # signed URLs
    (re.compile(r"(?i)(--?[\w-]*" + _SECRET_WORDS + r"[\w-]*(?:=|'?,\s*'|\s+))(?!--)"
                r"[^\s'\",\]&]+"), r"\1" + REDACTED),                        # --api_key=...
]


def redact_text(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``<redacted>``: known
    token and key formats, passwords in URLs, signed-URL parameters and the values of
    options named like credentials (``--s3_secret_access_key=...``)."""
    if not isinstance(text, str):
        return text
    for pattern, repl in _SECRET_VALUE:
        text = pattern.sub(repl, text)
    return text


def scrub_options(options: dict) -> dict:
    """Option values safe to record: values of options named like credentials (token,
    secret, password, key, ...) and values that look like tokens or keys are redacted."""
    out = {}
    for k, v in options.items():
        if v not in (None, "", False) and _SECRET_NAME.search(k) and not isinstance(v, bool):
            out[k] = REDACTED
        else:
            out[k] = _scrub_value(v)
    return out


def _scrub_value(v):
    if isinstance(v, str):
        return redact_text(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_scrub_value(x) for x in v)
    if isinstance(v, dict):
        return scrub_options(v)
    return v
