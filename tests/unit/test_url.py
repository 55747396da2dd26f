"""mqkit.url: parsing, options, redaction, portable names; connect() URL handling."""

from __future__ import annotations

import pytest

import mqkit
from mqkit.url import BrokerURL, Option, parse_url, validate_name

SECRET = "s3cr3tPW"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("url", "scheme", "hosts", "path"),
    [
        ("memory://", "memory", (), ""),
        ("memory://ns1", "memory", (("ns1", None),), ""),
        ("redis://127.0.0.1:6379/0", "redis", (("127.0.0.1", 6379),), "0"),
        ("rediss://cache.example:6380/3", "rediss", (("cache.example", 6380),), "3"),
        ("amqp://h:5672/my%2Fvhost", "amqp", (("h", 5672),), "my/vhost"),
        ("AMQPS://h", "amqps", (("h", None),), ""),
        ("kafka://a:1,b:2", "kafka", (("a", 1), ("b", 2)), ""),
        ("kafka://a:1, b:2 ,c", "kafka", (("a", 1), ("b", 2), ("c", None)), ""),
        ("amqp://[::1]:5672/vh", "amqp", (("::1", 5672),), "vh"),
        ("kafka://[::1]:9092,[fe80::2]:9093", "kafka", (("::1", 9092), ("fe80::2", 9093)), ""),
        ("rocketmq://127.0.0.1:8081", "rocketmq", (("127.0.0.1", 8081),), ""),
    ],
)
def test_parse_hosts_and_paths(url: str, scheme: str, hosts: tuple, path: str) -> None:
    parsed = parse_url(url)
    assert parsed.scheme == scheme
    assert parsed.hosts == hosts
    assert parsed.path == path
    assert parsed.host == (hosts[0][0] if hosts else "")
    assert parsed.port == (hosts[0][1] if hosts else None)


def test_user_password_and_query() -> None:
    parsed = parse_url(f"amqp://guest:{SECRET}@h:5672/vh?heartbeat=30&client_id=a%20b")
    assert parsed.username == "guest"
    assert parsed.password == SECRET
    assert dict(parsed.query) == {"heartbeat": "30", "client_id": "a b"}


def test_percent_encoded_credentials_and_at_in_password() -> None:
    parsed = parse_url("redis://us%40er:p%3Aw@d@h:1/0")
    assert parsed.username == "us@er"
    assert parsed.password == "p:w@d"
    assert parsed.hosts == (("h", 1),)


def test_password_only_and_blank_option() -> None:
    parsed = parse_url(f"redis://:{SECRET}@h:6379?flag=")
    assert parsed.username is None
    assert parsed.password == SECRET
    assert dict(parsed.query) == {"flag": ""}


@pytest.mark.parametrize(
    "url",
    [
        "kafka://h:0",
        "kafka://h:65536",
        "kafka://h:-1",
        "kafka://h:abc",
        "kafka://h:12x",
        "kafka://a:1,b:nope",
        "amqp://[::1]x",
        "kafka://a:1,,b:2",
        "redis://h?a=1&a=2",
        "redis://h?novalue",
        "redis://h?a=1&&b=2",
        "localhost:9092",
        "kafka:/h:9092",
        "",
        "://h",
        "1abc://h",
    ],
)
def test_malformed_urls_raise_config_error(url: str) -> None:
    with pytest.raises(mqkit.ConfigError):
        parse_url(url)


def test_non_string_url() -> None:
    with pytest.raises(mqkit.ConfigError):
        parse_url(None)  # type: ignore[arg-type]


def test_duplicate_option_names_it() -> None:
    with pytest.raises(mqkit.ConfigError, match="partitions"):
        parse_url("memory://x?partitions=1&partitions=2")


def test_unclosed_ipv6_bracket_is_config_error() -> None:
    with pytest.raises(mqkit.ConfigError):
        parse_url("amqp://[::1:5672")


def test_unicode_digit_port_is_config_error() -> None:
    with pytest.raises(mqkit.ConfigError):
        parse_url("kafka://h:\u00b2")


# ---------------------------------------------------------------- redaction


def test_password_never_in_repr_or_str() -> None:
    parsed = parse_url(f"amqp://guest:{SECRET}@h:5672/vh")
    for text in (repr(parsed), str(parsed), parsed.redacted()):
        assert SECRET not in text
        assert "***" in text
    assert parsed.redacted() == "amqp://guest:***@h:5672/vh"


def test_secret_looking_options_masked() -> None:
    parsed = parse_url(f"kafka://h:1?sasl_password={SECRET}&client_id=app&token={SECRET}")
    text = parsed.redacted()
    assert SECRET not in text and SECRET not in repr(parsed)
    assert "client_id=app" in text


def test_redacted_round_trips_without_secrets() -> None:
    url = "kafka://a:1,b:2/p?client_id=x"
    assert parse_url(str(parse_url(url))) == parse_url(url)


def test_redacted_keeps_ipv6_brackets() -> None:
    parsed = parse_url("amqp://[::1]:5672/vh")
    assert parsed.redacted() == "amqp://[::1]:5672/vh"
    assert parse_url(str(parsed)).hosts == parsed.hosts


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://guest:{SECRET}@h:notaport/vh",
        f"amqp://guest:{SECRET}@h:1,,x",
        f"redis://:{SECRET}@h:99999",
    ],
)
def test_password_not_in_error_messages(url: str) -> None:
    with pytest.raises(mqkit.ConfigError) as info:
        parse_url(url)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


@pytest.mark.parametrize(
    "url",
    [f"redis://h:bad?password={SECRET}", f"redis://h?password={SECRET}&&x"],
)
def test_query_secret_not_in_error_messages(url: str) -> None:
    with pytest.raises(mqkit.ConfigError) as info:
        parse_url(url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("sep", ["/", "?", "#"])
def test_password_with_reserved_char_not_in_error(sep: str) -> None:
    password = f"abcd{sep}efgh"
    with pytest.raises(mqkit.ConfigError) as info:
        parse_url(f"redis://user:{password}@host:6379/0")
    message = str(info.value)
    assert "abcd" not in message
    assert "efgh" not in message


def test_malformed_secret_option_value_masked() -> None:
    spec = {"password_len": Option(int, 0, secret=True)}
    url = parse_url(f"x://h?password_len={SECRET}")
    with pytest.raises(mqkit.ConfigError) as info:
        url.options(spec)
    assert SECRET not in str(info.value)
    assert "password_len" in str(info.value)


# ---------------------------------------------------------------- options


SPEC = {
    "partitions": Option(int, 4, "partitions"),
    "ratio": Option(float, 0.5),
    "tls": Option(bool, False),
    "client_id": Option(str, "mqkit"),
}


def test_options_defaults_and_conversion() -> None:
    assert parse_url("x://h").options(SPEC) == {
        "partitions": 4,
        "ratio": 0.5,
        "tls": False,
        "client_id": "mqkit",
    }
    values = parse_url("x://h?partitions=8&ratio=0.25&tls=yes&client_id=me").options(SPEC)
    assert values == {"partitions": 8, "ratio": 0.25, "tls": True, "client_id": "me"}


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(mqkit.ConfigError) as info:
        parse_url("x://h?bogus=1&zzz=2").options(SPEC)
    message = str(info.value)
    assert "bogus" in message and "zzz" in message
    for name in SPEC:
        assert name in message


def test_unknown_option_with_empty_spec() -> None:
    with pytest.raises(mqkit.ConfigError, match="none"):
        parse_url("x://h?a=1").options({})


@pytest.mark.parametrize("text", ["abc", "1.5", "", "0x10"])
def test_malformed_int(text: str) -> None:
    with pytest.raises(mqkit.ConfigError, match="partitions"):
        parse_url(f"x://h?partitions={text}").options(SPEC)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_bool_parsing(text: str, value: bool) -> None:
    assert parse_url(f"x://h?tls={text}").options(SPEC)["tls"] is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "y"])
def test_bool_malformed(text: str) -> None:
    with pytest.raises(mqkit.ConfigError, match="tls"):
        parse_url(f"x://h?tls={text}").options(SPEC)


def test_brokerurl_is_frozen() -> None:
    parsed = parse_url("x://h")
    assert isinstance(parsed, BrokerURL)
    with pytest.raises(AttributeError):
        parsed.scheme = "y"  # type: ignore[misc]


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", ["a", "orders", "Orders.v2", "a_b-c.d", "0", "-", "x" * 120, "A.Z_09-z"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
    assert validate_name(name, "group") == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 121,
        "has space",
        "a/b",
        "a\\b",
        "a:b",
        "a*",
        "caf\u00e9",
        "abc\n",
        "\tabc",
        None,
        5,
        b"abc",
        ["abc"],
    ],
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(mqkit.ConfigError, match="group"):
        validate_name(name, "group")


def test_invalid_name_rejected_even_after_valid_cached() -> None:
    validate_name("cached-name")
    with pytest.raises(mqkit.ConfigError):
        validate_name(b"cached-name")


# ---------------------------------------------------------------- connect


def test_connect_unknown_scheme_lists_known() -> None:
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect("nope://x")
    message = str(info.value)
    assert "nope" in message
    for scheme in ("memory", "kafka", "redis", "amqp", "rocketmq"):
        assert scheme in message


def test_connect_unknown_memory_option() -> None:
    with pytest.raises(mqkit.ConfigError, match="bogus"):
        mqkit.connect("memory://?bogus=1")


def test_connect_malformed_memory_option() -> None:
    with pytest.raises(mqkit.ConfigError, match="partitions"):
        mqkit.connect("memory://x?partitions=many")


def test_connect_memory_rejects_credentials() -> None:
    with pytest.raises(mqkit.ConfigError) as info:
        mqkit.connect(f"memory://u:{SECRET}@x")
    assert SECRET not in str(info.value)


def test_connect_uses_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_URL", "memory://from-env")
    broker = mqkit.connect()
    assert broker.url == "memory://from-env"


def test_connect_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_URL", "nope://x")
    with pytest.raises(mqkit.ConfigError):
        mqkit.connect()


def test_connect_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQKIT_URL", raising=False)
    broker = mqkit.connect()
    assert broker.url == mqkit.DEFAULT_URL == "memory://"
    assert "memory://" in repr(broker)


def test_connect_empty_env_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_URL", "")
    assert mqkit.connect().url == "memory://"
