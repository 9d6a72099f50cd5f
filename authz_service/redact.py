"""What of a request may be written down: the one redaction rule for every log line.

Every value that reaches a log line from a request passes through `redact`: never a token, a
cookie, a secret or a claims body; the path without its query (queries carry `access_token=` in
the wild). (test-policy's explanations quote context values instead; `policy/explain.Redactor`
takes the request's own secrets out of those, which no fixed rule could.)
"""

from __future__ import annotations

import hashlib
import re

# A request id the client chose is kept only when it is plainly an id.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class redact:
    """The one redaction helper: what of a request may appear in a log line."""

    @staticmethod
    def identifier(value: str) -> str:
        """An id the client chose (request id): kept if plainly an id, else only a hash of it."""
        if not value:
            return ""
        if _SAFE_ID.match(value) and not value.startswith("eyJ"):
            return value
        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    @staticmethod
    def path(value: str) -> str:
        """The request path without its query, capped."""
        return value.partition("?")[0][:256]

    @staticmethod
    def method(value: str) -> str:
        """The request method, capped: nginx and Traefik pass it in X-Forwarded-Method, which a
        client may fill with anything (the longest registered method has 17 characters)."""
        return value[:32]

    @staticmethod
    def user_id(value: str | None) -> str | None:
        """User ids are not secrets (they go upstream in a header), but they are capped."""
        return None if value is None else value[:128]
