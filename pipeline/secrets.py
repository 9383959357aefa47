"""Credentials in URLs: used to connect, never shown or stored.

A corpus mirror or a tracking server may need a user and password, given the usual way in the
URL (``https://user:password@host/...``). Everything the pipeline prints, logs to MLflow or writes
to a file shows such a URL as ``https://user:***@host/...``; connections send the credentials as an
HTTP basic-auth header, since neither urllib nor a socket takes them from the host part.
"""

from __future__ import annotations

import base64
import re
import urllib.parse

MASK = "***"
# scheme://user:password@ anywhere in a text (a URL inside an error message, too). As urlsplit
# reads it, the password runs to the last "@" before the path's "/": it may hold "@" and ":".
_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^/\s]*(?=@)")


def masked(text: str) -> str:
    """The text with the password of every URL in it replaced by ***."""
    return _CREDENTIALS.sub(lambda match: match["head"] + MASK, text)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(url without user and password, user, password); the user and password are unquoted."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    unquote = urllib.parse.unquote
    return bare, unquote(parts.username or ""), unquote(parts.password or "")


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}
