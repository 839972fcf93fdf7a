"""The grammars that guard every name, path and address written into nginx configs."""

from __future__ import annotations

import pytest

from yakpanel.hostnames import (
    InvalidName,
    normalize_domain,
    validate_fastcgi,
    validate_redirect_target,
    validate_upstream,
    validate_url_path,
)

# Each entry: (value, a fragment the error message must contain, so the user learns why).
DOMAIN_INJECTIONS = [
    ("example.com;", "';'"),
    ("example.com; return 200 x", "';'"),
    ("exa{mple.com", "'{'"),
    ("example.com}", "'}'"),
    ("example.com\nserver_name evil.com", "line breaks"),
    ("example.com\r", "line breaks"),
    ("example .com", "spaces"),
    ("example.com\t", "spaces"),
    ('"example.com"', "'\"'"),
    ("'example.com'", '"\'"'),
    ("`id`.example.com", "'`'"),
    ("$host.example.com", "'$'"),
    ("example\\.com", "'\\\\'"),
    ("example..com", "empty label"),
    ("..", "empty label"),
    (".example.com", "empty label"),
    ("example\x00.com", "control"),
    ("exa\u200bmple.com", "invisible"),
    ("ex\u0430mple.com", "mixes writing systems"),  # Cyrillic a inside Latin
    ("\u0430\u0440\u0440\u04cf\u0435.com", "Cyrillic or Greek letters"),  # "apple" in Cyrillic
    ("xn--80ak6aa92e.com", "Cyrillic or Greek letters"),  # the same, already in punycode
    ("\uff45xample.com", "look-alike"),  # fullwidth e
    ("\u2460.example.com", "look-alike"),  # circled digit one, a compatibility form
    ("a" * 64 + ".com", "63"),
    (".".join(["a" * 63] * 4) + ".com", "253"),
    ("*.example.com", "wildcard"),
    ("*", "wildcard"),
    ("", "empty"),
    ("localhost", "two labels"),
    ("example.123", "all digits"),
    ("192.168.0.1", "IP address"),
    ("[::1]", "IP address"),
    ("-example.com", "start or end with '-'"),
    ("example-.com", "start or end with '-'"),
    ("ex_ample.com", "'_'"),
    ("ex/ample.com", "'/'"),
    ("ab--cd.com", "reserved"),
    ("xn--zzzzzz-.com", "start or end"),
]


@pytest.mark.parametrize(("value", "reason"), DOMAIN_INJECTIONS)
def test_domain_injection_corpus_is_rejected_with_the_rule_broken(value: str, reason: str) -> None:
    with pytest.raises(InvalidName) as caught:
        normalize_domain(value, field="domains[0]")
    message = str(caught.value)
    assert message.startswith("domains[0]"), message
    assert reason in message, message
    # The message must be safe to show and log: no raw control characters from the input.
    assert "\n" not in message and "\r" not in message and "\x00" not in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Example.COM", "example.com"),
        ("www.example.co.uk", "www.example.co.uk"),
        ("example.com.", "example.com"),
        ("a-b.example.com", "a-b.example.com"),
        ("b\u00fccher.de", "xn--bcher-kva.de"),
        ("B\u00fccher.de", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444", "xn--e1afmkfd.xn--p1ai"),
        ("\u65e5\u672c\u306e.jp", "xn--u9ju32nb2a.jp"),  # Han + Hiragana is one writing system
        ("1and1.com", "1and1.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_valid_domains_normalize_to_lowercase_ascii(value: str, expected: str) -> None:
    assert normalize_domain(value) == expected


def test_wildcard_only_when_allowed_and_only_as_first_label() -> None:
    assert normalize_domain("*.Example.com", allow_wildcard=True) == "*.example.com"
    for bad in ("a.*.example.com", "*a.example.com", "*.com"):
        with pytest.raises(InvalidName, match="wildcard"):
            normalize_domain(bad, allow_wildcard=True)


@pytest.mark.parametrize(
    "value",
    ["/", "/old-page", "/a/b/c.html", "/%7Euser/", "/a_b~c.d-e"],
)
def test_url_paths_accepted(value: str) -> None:
    assert validate_url_path(value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("old", "start with '/'"),
        ("/a;b", "';'"),
        ("/a{b}", "'{'"),
        ("/a b", "spaces"),
        ("/a\nb", "line breaks"),
        ("/a?x=1", "only letters"),
        ("/a#frag", "only letters"),
        ("/../etc/passwd", "'..'"),
        ("/a/./b", "'.'"),
        ("/%2e%2e/secret", "'..'"),
        ("/a%0ab", "control"),
        ("/a%252e", "encoded twice"),
        ("/" + "a" * 1024, "1024"),
        ("/$uri", "'$'"),
    ],
)
def test_url_paths_rejected(value: str, reason: str) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_url_path(value, field="source")
    assert str(caught.value).startswith("source")
    assert reason in str(caught.value)


def test_redirect_targets() -> None:
    assert validate_redirect_target("/new") == "/new"
    assert validate_redirect_target("HTTPS://Example.com") == "https://example.com"
    assert (
        validate_redirect_target("https://b\u00fccher.de:8443/x/y")
        == "https://xn--bcher-kva.de:8443/x/y"
    )
    for bad in (
        "//evil.example.com/x",  # protocol-relative
        "ftp://example.com/",
        "javascript:alert(1)",
        "https://user@example.com/",
        "https://example.com:0/",
        "https://example.com:65536/",
        "https://ex\u0430mple.com/",
        "https://example.com/$request_uri",
        "https://example.com/a b",
        "https://example.com/?q=1",
    ):
        with pytest.raises(InvalidName):
            validate_redirect_target(bad)


def test_upstreams() -> None:
    assert validate_upstream("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert validate_upstream("HTTP://LocalHost:3000/app") == "http://localhost:3000/app"
    assert validate_upstream("https://api.example.com:443") == "https://api.example.com:443"
    assert validate_upstream("http://[::1]:8080") == "http://[::1]:8080"
    assert validate_upstream("unix:/run/app/web.sock") == "unix:/run/app/web.sock"
    for bad, reason in [
        ("http://127.0.0.1", "needs a port"),
        ("127.0.0.1:8080", "must be http"),
        ("http://127.0.0.1:99999", "1 to 65535"),
        ("http://127.0.0.1:80;", "';'"),
        ("http://exa mple.com:80", "spaces"),
        ("unix:relative.sock", "absolute"),
        ("unix:/run/../etc/x.sock", "'..'"),
        ("unix:/run/a b.sock", "spaces"),
        ("gopher://example.com:70", "must be http"),
        ("http://[::1:8080", "']'"),
    ]:
        with pytest.raises(InvalidName) as caught:
            validate_upstream(bad)
        assert reason in str(caught.value), (bad, str(caught.value))


def test_fastcgi_addresses() -> None:
    assert validate_fastcgi("127.0.0.1:9000") == "127.0.0.1:9000"
    assert validate_fastcgi("unix:/run/php/php8.2-fpm.sock") == "unix:/run/php/php8.2-fpm.sock"
    assert validate_fastcgi("php.internal.example:9000") == "php.internal.example:9000"
    for bad in ("127.0.0.1", "http://127.0.0.1:9000", "unix:/run/php.sock;", "127.0.0.1:9000\n"):
        with pytest.raises(InvalidName):
            validate_fastcgi(bad)
