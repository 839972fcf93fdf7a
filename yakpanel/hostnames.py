"""Strict grammars for names and addresses that end up inside generated configuration.

Everything a tenant types that reaches an nginx server block (server names, redirect
sources and targets, upstream and FastCGI addresses) passes through one of these
functions first. They accept a deliberately narrow language — no quoting or escaping is
ever needed when the result is written into a config file — and reject everything else
with a message that names the field and the rule, never the raw value's dangerous bytes.

International names are accepted only in a form a person cannot confuse with another
name: a label that mixes scripts (`example` spelt with a Cyrillic `a`, U+0430), that is
made only of Cyrillic/Greek letters looking like Latin ones, or that IDNA's UTS-46 mapping would
silently change (fullwidth letters such as U+FF45, compatibility forms) is refused
instead of mapped.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

import idna

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
MAX_PATH_LENGTH = 1024

_FORBIDDEN = set(";{}\"'`$\\")
_ASCII_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_PATH = re.compile(r"/(?:[A-Za-z0-9._~/-]|%[0-9A-Fa-f]{2})*\Z")
_SOCKET_PATH = re.compile(r"/[A-Za-z0-9._/-]+\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")

# Scripts that legitimately share one label (Japanese writing mixes all three).
_COMPATIBLE_SCRIPTS = {frozenset({"CJK", "HIRAGANA", "KATAKANA"})}
# Cyrillic and Greek letters that render like Latin ones: a label made only of these
# (`apple` spelt in Cyrillic) is a whole-script look-alike of an ASCII name.
_LATIN_LOOKALIKES = set(
    "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0455\u0501"  # Cyrillic
    "\u04cf\u051b\u051d\u04bb\u043a\u043c\u043d\u0442\u0432\u043f"
    "\u03bf\u03b1\u03bd\u03c1\u03c4\u03c5\u03b9\u03ba\u03c7\u03b5"  # Greek
)


class InvalidName(ValueError):
    """A value does not follow its grammar; the message names the field and the rule."""


def normalize_domain(value: str, *, field: str = "domain", allow_wildcard: bool = False) -> str:
    """The lowercase ASCII (punycode) form of a host name, or `InvalidName`.

    A single trailing dot (the fully qualified form) is accepted and dropped.
    With `allow_wildcard`, `*.example.com` is accepted (a `*` as the whole first label).
    """
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string")
    _reject_unsafe_characters(value, field)
    if value == "":
        raise InvalidName(f"{field} is empty; give a host name such as example.com")
    text = unicodedata.normalize("NFC", value)
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    if _is_ip_literal(text):
        raise InvalidName(f"{field} is an IP address; give a host name such as example.com")
    if "*" in text and not allow_wildcard:
        raise InvalidName(f"{field} must not contain a wildcard '*'")
    labels = text.split(".")
    if any(label == "" for label in labels):
        raise InvalidName(
            f"{field} has an empty label (two dots in a row, or a leading dot); "
            "labels are separated by single dots"
        )
    if len(labels) < 2:
        raise InvalidName(
            f"{field} must have at least two labels (like example.com); "
            "single-label names cannot be served publicly"
        )
    wildcard = False
    if "*" in text:
        if labels[0] != "*" or "*" in ".".join(labels[1:]):
            raise InvalidName(f"{field}: a wildcard is only allowed as the whole first label, '*.'")
        if len(labels) < 3:
            raise InvalidName(f"{field}: a wildcard needs at least two labels after '*.'")
        wildcard = True
        labels = labels[1:]
    ascii_labels = [_label_to_ascii(label, field) for label in labels]
    if ascii_labels[-1].isdigit():
        raise InvalidName(f"{field}: the last label (top-level domain) must not be all digits")
    name = ".".join(ascii_labels)
    if wildcard:
        name = "*." + name
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"{field} is {len(name)} characters long in its ASCII form; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    return name


def validate_url_path(value: str, *, field: str = "path") -> str:
    """A URL path for an exact-match location: `/`, unreserved characters, %XX escapes."""
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string")
    _reject_unsafe_characters(value, field)
    if len(value) > MAX_PATH_LENGTH:
        raise InvalidName(f"{field} is longer than {MAX_PATH_LENGTH} characters")
    if not value.startswith("/"):
        raise InvalidName(f"{field} must start with '/'")
    if not _PATH.match(value):
        raise InvalidName(
            f"{field} may contain only letters, digits, '.', '_', '~', '-', '/' "
            "and %XX escapes (no spaces, query strings or fragments)"
        )
    decoded = re.sub(
        r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value
    )  # nginx matches locations against the decoded URI
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise InvalidName(f"{field} must not encode control characters")
    if any(segment in ("..", ".") for segment in decoded.split("/")):
        raise InvalidName(f"{field} must not contain '.' or '..' segments")
    if "%" in decoded and decoded != value and re.search(r"%[0-9A-Fa-f]{2}", decoded):
        raise InvalidName(f"{field} must not be encoded twice")
    return value


def validate_redirect_target(value: str, *, field: str = "target") -> str:
    """A local path (as `validate_url_path`) or an absolute http(s) URL to a valid host."""
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string")
    _reject_unsafe_characters(value, field)
    if value.startswith("/") and not value.startswith("//"):
        return validate_url_path(value, field=field)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise InvalidName(f"{field} must be a path starting with '/' or an http(s):// URL")
    authority, slash, path = rest.partition("/")
    host, port = _split_host_port(authority, field, port_required=False)
    url = f"{scheme.lower()}://{host}"
    if port is not None:
        url += f":{port}"
    if slash:
        url += validate_url_path("/" + path, field=field)
    return url


def validate_upstream(value: str, *, field: str = "upstream") -> str:
    """`http(s)://host:port[/path]` or `unix:/abs/path.sock` for a reverse proxy."""
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string")
    _reject_unsafe_characters(value, field)
    if value.startswith("unix:"):
        return "unix:" + _socket_path(value[len("unix:") :], field)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise InvalidName(
            f"{field} must be http://host:port, https://host:port or unix:/path/to.sock"
        )
    authority, slash, path = rest.partition("/")
    host, port = _split_host_port(authority, field, port_required=True)
    url = f"{scheme.lower()}://{host}:{port}"
    if slash:
        url += validate_url_path("/" + path, field=field)
    return url


def validate_fastcgi(value: str, *, field: str = "upstream") -> str:
    """A FastCGI (PHP-FPM) address: `unix:/abs/path.sock` or `host:port`."""
    if not isinstance(value, str):
        raise InvalidName(f"{field} must be a string")
    _reject_unsafe_characters(value, field)
    if value.startswith("unix:"):
        return "unix:" + _socket_path(value[len("unix:") :], field)
    if "/" in value:
        raise InvalidName(f"{field} must be host:port or unix:/path/to.sock")
    host, port = _split_host_port(value, field, port_required=True)
    return f"{host}:{port}"


def _reject_unsafe_characters(value: str, field: str) -> None:
    for char in value:
        if char in _FORBIDDEN:
            raise InvalidName(
                f"{field} must not contain {char!r}: quotes, braces, ';', '$', "
                "backticks and backslashes are not allowed"
            )
        if char.isspace():
            raise InvalidName(f"{field} must not contain spaces, tabs or line breaks")
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise InvalidName(f"{field} must not contain control or invisible characters")


def _label_to_ascii(label: str, field: str) -> str:
    if label.isascii():
        ascii_label = label.lower()
        if not _ASCII_LABEL.match(ascii_label) or len(ascii_label) > MAX_LABEL_LENGTH:
            _explain_ascii_label(ascii_label, field)
        if ascii_label[2:4] == "--":
            if not ascii_label.startswith("xn--"):
                raise InvalidName(
                    f"{field}: label {ascii_label!r} has '--' in positions 3-4, "
                    "which is reserved for encoded (xn--) labels"
                )
            try:
                unicode_label = idna.decode(ascii_label)
            except idna.IDNAError:
                raise InvalidName(f"{field}: label {ascii_label!r} is not valid punycode") from None
            _check_unicode_label(unicode_label, field)
        return ascii_label
    _check_unicode_label(label, field)
    try:
        ascii_label = idna.encode(label.lower()).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidName(f"{field}: label is not a valid international name ({exc})") from None
    if len(ascii_label) > MAX_LABEL_LENGTH:
        raise InvalidName(
            f"{field}: a label is {len(ascii_label)} characters long in its ASCII form; "
            f"the limit is {MAX_LABEL_LENGTH}"
        )
    return ascii_label


def _explain_ascii_label(label: str, field: str) -> None:
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidName(
            f"{field}: a label is {len(label)} characters long; the limit is {MAX_LABEL_LENGTH}"
        )
    if label.startswith("-") or label.endswith("-"):
        raise InvalidName(f"{field}: labels must not start or end with '-'")
    raise InvalidName(
        f"{field} may contain only letters, digits, '-' and dots (found {_first_bad(label)!r})"
    )


def _first_bad(label: str) -> str:
    for char in label:
        if not (char.isalnum() or char == "-"):
            return char
    return label[:1]


def _check_unicode_label(label: str, field: str) -> None:
    try:
        mapped = idna.uts46_remap(label, std3_rules=True, transitional=False)
    except idna.IDNAError:
        raise InvalidName(f"{field} contains characters not allowed in host names") from None
    if mapped != label.lower():
        raise InvalidName(
            f"{field} contains look-alike or compatibility characters (such as fullwidth "
            "letters) that would be silently changed; type the name with ordinary letters"
        )
    scripts = {_script(char) for char in label} - {"COMMON"}
    if len(scripts) > 1 and not any(scripts <= allowed for allowed in _COMPATIBLE_SCRIPTS):
        raise InvalidName(
            f"{field} mixes writing systems ({', '.join(sorted(scripts)).lower()}) in one "
            "label, which is how look-alike names are made; use a single script per label"
        )
    letters = [c for c in label if _script(c) != "COMMON"]
    if letters and all(c in _LATIN_LOOKALIKES for c in letters) and scripts & {"CYRILLIC", "GREEK"}:
        raise InvalidName(
            f"{field} is written only with Cyrillic or Greek letters that look like Latin "
            "ones, which imitates another name; type it with Latin letters"
        )


def _script(char: str) -> str:
    if char.isascii():
        return "LATIN" if char.isalpha() else "COMMON"
    if unicodedata.category(char).startswith(("M", "N", "P", "S")):
        return "COMMON"
    name = unicodedata.name(char, "")
    first = name.split(" ", 1)[0]
    if first == "CJK" or name.startswith("IDEOGRAPHIC"):
        return "CJK"
    return first or "UNKNOWN"


def _is_ip_literal(text: str) -> bool:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _split_host_port(authority: str, field: str, *, port_required: bool) -> tuple[str, int | None]:
    if "@" in authority:
        raise InvalidName(f"{field} must not contain user information ('@')")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidName(f"{field}: an IPv6 address must be closed with ']'")
        try:
            address = ipaddress.IPv6Address(authority[1:end])
        except ValueError:
            raise InvalidName(f"{field}: {authority[1:end]!r} is not an IPv6 address") from None
        host = f"[{address.compressed}]"
        rest = authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidName(f"{field}: expected ':port' after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_part = authority.partition(":")
        port_text = port_part if colon else None
        if not name:
            raise InvalidName(f"{field} needs a host")
        try:
            host = str(ipaddress.IPv4Address(name))
        except ValueError:
            host = (
                "localhost"
                if name.lower() == "localhost"
                else normalize_domain(name, field=f"{field} host")
            )
    if port_text is None:
        if port_required:
            raise InvalidName(f"{field} needs a port, like host:8080")
        return host, None
    if not _PORT.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise InvalidName(f"{field}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _socket_path(path: str, field: str) -> str:
    if not path.startswith("/"):
        raise InvalidName(f"{field}: a unix socket path must be absolute, like unix:/run/app.sock")
    if len(path) > 107:
        raise InvalidName(f"{field}: a unix socket path is limited to 107 characters")
    if not _SOCKET_PATH.match(path):
        raise InvalidName(
            f"{field}: a unix socket path may contain only letters, digits, '.', '_', '-', '/'"
        )
    if any(segment in ("..", ".") for segment in path.split("/")):
        raise InvalidName(f"{field}: a unix socket path must not contain '.' or '..' segments")
    if path.endswith("/"):
        raise InvalidName(f"{field}: a unix socket path must name a file, not a directory")
    return path
