"""The command line: no option is ever taken by prefix, and bad values get a clear message."""
from __future__ import annotations

import pytest

from turbine.cli import _parse, build_parser


@pytest.mark.parametrize("argv", [
    ["frontend", "--discovery-dir", "d", "--discovery", "etcd://h:2379"],  # not a second --discovery-dir
    ["worker", "--model", "m", "--discovery-dir", "d", "--num", "2"],  # --num-workers
    ["serve", "--work", "2"],  # --workers
    ["--log", "DEBUG", "serve"],  # --log-level
    ["bench", "--conc", "4"],  # --concurrency
])
def test_option_prefixes_are_refused(argv: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "invalid choice" in err, err


def test_every_subcommand_refuses_abbreviations() -> None:
    parser = build_parser()
    assert parser.allow_abbrev is False
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        assert p.allow_abbrev is False, name


def test_full_names_still_work() -> None:
    args = _parse(["frontend", "--discovery-dir", "/tmp/d", "--drain-timeout", "5", "--api-key", "k"])
    assert str(args.discovery_dir) == "/tmp/d" and args.drain_timeout == 5 and args.api_key == ["k"]


@pytest.mark.parametrize("argv,message", [
    (["serve", "--drain-timeout", "-1"], "drain timeout"),
    (["serve", "--request-timeout", "0"], "request timeout"),
    (["serve", "--tls-certfile", "/nonexistent.pem"], "TLS"),
    (["serve", "--tls-certfile", "/nonexistent.pem", "--tls-keyfile", "/nonexistent.key"], "certificate"),
    (["serve", "--max-connections", "0"], "max_connections"),
])
def test_bad_frontend_settings_are_a_clear_message(argv: list[str], message: str) -> None:
    from turbine.cli import _frontend_config

    with pytest.raises(SystemExit, match=message):
        _frontend_config(_parse(argv))
