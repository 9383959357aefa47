"""Credentials in URLs: used to connect, only to the origin the user named, never shown or stored.

A corpus mirror or a tracking server may need a user and password, given the usual way in the
URL (``https://user:password@host/...``), or a token alone (``https://TOKEN@host/...``, GitHub's
form). Everything the pipeline prints, logs to MLflow or writes to a file shows such a URL as
``https://user:***@host/...`` or ``https://***@host/...``, and a secret in its query
(``?access_token=...``, ``?sig=...``) as ``?access_token=***``. Connections send the credentials
as an HTTP basic-auth header, since neither urllib nor a socket takes them from the host part;
``open_url`` drops that header on a redirect to another origin (scheme, host and port), so a
server cannot hand them to another host, or from https to plain http.
"""

from __future__ import annotations

import base64
import functools
import re
import urllib.parse
from io import BufferedIOBase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl
    import urllib.request

MASK = "***"
_SCHEME = r"\b[a-zA-Z][a-zA-Z0-9+.-]*://"
# scheme://user:password@ anywhere in a text (a URL inside an error message, too), the password
# read as the most generous parser reads it: urlsplit runs it to the last "@" before the host's
# "/", "?" or "#" (so it may hold "@" and ":"); SQLAlchemy runs it to the first "@" (so it may
# hold "/", "?" and "#"). The longer reading is masked.
_PASSWORD = re.compile(rf"(?P<head>{_SCHEME}[^:/?#@\s]*:)[^@\s]*(?:@[^@/?#\s]*)*(?=@)")
# scheme://TOKEN@: user info without a password may be a token, so all of it is masked.
_USER_ONLY = re.compile(rf"(?P<head>{_SCHEME})[^:/?#@\s]+(?=@)")
# A query or fragment field whose name says it holds a secret: access_token, token, password,
# secret, key, api_key, sig, signature, X-Amz-Credential, auth, session ...
_SECRET_FIELD = re.compile(
    r"(?P<head>[?&;#][^=&#;\s]*?(?:token|passw|pwd|secret|key|sig|auth|credential|session)"
    r"[^=&#;\s]*=)[^&#;\s'\"]*",
    re.IGNORECASE,
)
# The header urllib would copy to wherever a server redirects.
AUTHORIZATION = "Authorization"
DEFAULT_PORTS = {"http": 80, "https": 443}


def masked(text: str) -> str:
    """The text with every secret a URL in it can carry replaced by ***: the password of the
    user info (or all of the user info when it has no password), and secret query fields."""
    text = _PASSWORD.sub(lambda match: match["head"] + MASK, text)
    text = _USER_ONLY.sub(lambda match: match["head"] + MASK, text)
    return _SECRET_FIELD.sub(lambda match: match["head"] + MASK, text)


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
    return {AUTHORIZATION: f"Basic {token}"}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the port filled in; None when it has no valid one."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number
        return None
    if parts.hostname is None or port is None:
        return None
    return scheme, parts.hostname, port


def drops_credentials(from_url: str, to_url: str) -> bool:
    """Whether a redirect from from_url to to_url must not carry the request's credentials:
    another scheme (https to http, too), host or port, or an origin that cannot be read."""
    before = origin(from_url)
    return before is None or origin(to_url) != before


@functools.cache
def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    # Imported here, not at the top: every stage imports this module (pipeline.cli masks its
    # errors), and urllib.request with ssl costs 50 ms that only a stage that connects pays.
    import urllib.request

    class CredentialsStayAtTheirOrigin(urllib.request.HTTPRedirectHandler):
        """Follows redirects, sending Authorization only to the origin first asked.

        urllib's own handler copies every header to the new URL, whatever its host or scheme.
        """

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and drops_credentials(req.full_url, newurl):
                # Once dropped, the header stays dropped for the rest of the chain.
                new.remove_header(AUTHORIZATION)
            return new

    handlers: list[urllib.request.BaseHandler] = [CredentialsStayAtTheirOrigin()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def open_url(
    request: urllib.request.Request | str,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> BufferedIOBase:
    """urllib.request.urlopen, except that credentials never follow a redirect to another origin.

    What it returns for an http(s) URL is an http.client.HTTPResponse, a buffered binary stream.

    Every connection that may carry a user's credentials goes through here.
    """
    return _opener(context).open(request, timeout=timeout)
