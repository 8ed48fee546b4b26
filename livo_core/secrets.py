"""Keeping API keys out of configs, run folders, Prefect parameters and messages.

livo reads a key only from the environment variable a config names (`llm.api_key_env`). A value that
looks like a key anywhere in a config is refused before anything runs, and the error names the field,
never the value: a key pasted into a config would otherwise be stored in RUN/config.json, sent to Prefect
as a flow parameter and echoed in error lines. `redact` is the last line of defence for any message.
"""

from __future__ import annotations

import re
from typing import Any

# Key formats of common providers, then a generic rule: a long token mixing upper case, lower case and
# digits (sha256 hex, paths, hub ids and sentences do not match it).
# A key body is a run of 16+ key characters with an upper-case letter and a digit in it (base62 random):
# words in paths ("dask_task_runner") have no such run.
_BODY = r"(?=[A-Za-z0-9_\-]*[A-Z])(?=[A-Za-z0-9_\-]*[0-9])[A-Za-z0-9_\-]{16,}"
_KNOWN = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:sk|rk|pk)[-_](?:proj-|live_|test_|ant-)?(?=[A-Za-z0-9_\-]*[0-9])[A-Za-z0-9_\-]{20,}"  # OpenAI, DeepSeek, Stripe-like
    rf"|hf_{_BODY}"                                                     # Hugging Face
    rf"|gh[pousr]_{_BODY}|github_pat_{_BODY}"                           # GitHub
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"                                    # Slack
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{30,}"                        # AWS, Google
    r"|eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}"  # JWT
    r")"
)
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{32,}")


def _generic(token: str) -> bool:
    return (any(c.isupper() for c in token) and any(c.islower() for c in token) and any(c.isdigit() for c in token)
            and "/" not in token)


def looks_like_secret(text: str) -> bool:
    """True if `text` holds something shaped like an API key or token."""
    if not isinstance(text, str):
        return False
    return bool(_KNOWN.search(text)) or any(_generic(m.group(0)) for m in _TOKEN.finditer(text))


def redact(text: str) -> str:
    """`text` with every key-shaped token replaced by "[redacted]"."""
    text = _KNOWN.sub("[redacted]", text)
    return _TOKEN.sub(lambda m: "[redacted]" if _generic(m.group(0)) else m.group(0), text)


def secret_fields(data: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields of a (nested) config mapping whose value looks like a key."""
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += secret_fields(v, f"{prefix}{k}.")
            if looks_like_secret(str(k)):
                found.append(f"{prefix}<a key named like a secret>")
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found += secret_fields(v, f"{prefix}{i}.")
    elif isinstance(data, str) and looks_like_secret(data):
        found.append(prefix.rstrip("."))
    return found
