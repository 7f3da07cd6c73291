"""The command line: no option is ever taken by prefix, and bad values get a clear message."""
from __future__ import annotations

import pytest

from turbine.cli import _parse, build_parser


@pytest.mark.parametrize("argv", [
    ["frontend", "--discovery", "etcd://h:2379", "--discovery-t", "3"],  # --discovery-ttl
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


# --- the fleet's runtime configuration (turbine/runtime/config.py) ------------------------------
@pytest.fixture
def no_env_token(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TURBINE_CLUSTER_TOKEN", raising=False)


def test_discovery_and_discovery_dir_exclude_each_other_and_one_is_required(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        _parse(["frontend", "--discovery-dir", "d", "--discovery", "etcd://h:2379"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["worker", "--model", "m"])
    assert "one of the arguments --discovery --discovery-dir is required" in capsys.readouterr().err


def test_discovery_dir_is_file_discovery(tmp_path, no_env_token) -> None:  # type: ignore[no-untyped-def]
    from turbine.cli import _runtime_config

    a = _runtime_config(_parse(["frontend", "--discovery-dir", str(tmp_path)]))
    b = _runtime_config(_parse(["frontend", "--discovery", f"file://{tmp_path}"]))
    assert a == b and a.discovery.scheme == "file" and a.cluster_token  # the directory's token file
    serve = _runtime_config(_parse(["serve"]))
    assert serve.inproc and serve.cluster_token is None


def test_worker_advertise_host_binds_there_and_needs_the_token(no_env_token) -> None:  # type: ignore[no-untyped-def]
    from turbine.cli import _runtime_config

    with pytest.raises(SystemExit, match=r"turbine worker: the planes listen on 10\.9\.0\.2.*--cluster-token"):
        _runtime_config(_parse(["worker", "--model", "m", "--discovery", "etcd://10.9.0.1:2379",
                                "--advertise-host", "10.9.0.2"]))
    args = _parse(["worker", "--model", "m", "--discovery", "etcd://10.9.0.1:2379", "--advertise-host", "10.9.0.2",
                   "--cluster-token", "t0k", "--discovery-ttl", "4"])
    cfg = _runtime_config(args)
    assert (cfg.bind_host, cfg.advertise_host, cfg.cluster_token, cfg.discovery_ttl_s) == ("10.9.0.2", "10.9.0.2",
                                                                                          "t0k", 4)
    assert args.host == "10.9.0.2"  # the health endpoint binds there too
    cfg = _runtime_config(_parse(["worker", "--model", "m", "--discovery", "etcd://127.0.0.1"]))
    assert cfg.bind_host == "127.0.0.1" and cfg.cluster_token is None  # one machine: no token needed


@pytest.mark.parametrize("argv,message", [
    (["frontend", "--discovery", "mem://"], "mem:// is one process"),
    (["frontend", "--discovery", "etcd://10.9.0.1"], "needs its shared token"),
    (["frontend", "--discovery", "etcd:10.9.0.1"], "want mem://"),
    (["worker", "--model", "m", "--discovery", "etcd://h:99999"], "port"),
    (["serve", "--discovery", "etcd://127.0.0.1", "--discovery-ttl", "0"], "--discovery-ttl"),
])
def test_bad_fleet_settings_are_a_clear_message(argv: list[str], message: str, no_env_token) -> None:  # type: ignore[no-untyped-def]
    from turbine.cli import _runtime_config

    with pytest.raises(SystemExit, match=message):
        _runtime_config(_parse(argv))


def test_planner_local_workers_join_the_planners_discovery() -> None:
    from turbine.planner.connectors.local import worker_command

    args = _parse(["planner", "--discovery", "etcd://10.9.0.1:2379/fleet"])
    cmd = worker_command("decode", ["--engine", "mock"], discovery_dir=args.discovery_dir)
    assert cmd[cmd.index("worker") + 1:] == ["--discovery", "etcd://10.9.0.1:2379/fleet", "--role", "decode",
                                            "--engine", "mock"]
    cmd = worker_command("agg", [], discovery_dir=_parse(["planner", "--discovery-dir", "/tmp/d"]).discovery_dir)
    assert cmd[cmd.index("worker") + 1:] == ["--discovery-dir", "/tmp/d", "--role", "agg"]
    cmd = _parse(["worker", "--model", "m", *cmd[cmd.index("worker") + 1:]])  # what the worker parses
    assert str(cmd.discovery_dir) == "/tmp/d"


@pytest.mark.parametrize("value,ok", [("0", False), ("-5", False), ("1001", False), ("2.5", True), ("1000", True)])
def test_load_interval_is_checked_and_reaches_the_workers(value: str, ok: bool, model_dir) -> None:  # type: ignore[no-untyped-def]
    from turbine.cli import _worker_options

    args = _parse(["worker", "--model", str(model_dir), "--discovery-dir", "d", "--load-interval-ms", value])
    if not ok:
        with pytest.raises(SystemExit, match="--load-interval-ms must be in"):
            _worker_options(args)
        return
    assert _worker_options(args).load_interval_s == pytest.approx(float(value) / 1e3)
