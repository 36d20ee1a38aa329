"""Configuration is parsed strictly: every error names the file, the key or row, and the problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from antifraud.cli import main
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings, load_settings

UNITS_HEADER = "id,kind,channel,estate,grid,station,name\n"


class TestExampleDeployment:
    def test_loads_with_every_id_of_the_fixtures(self, settings: Settings) -> None:
        assert len(settings.units) == 15
        assert set(settings.estates) == {"E-YJ-CH", "E-YJ-JH", "E-YJ-DK", "E-ST-XH"}
        assert len(settings.subscribers) == 5
        assert [r.id for r in settings.rules] == [
            "flagged_call_watch",
            "long_call_flagged",
            "impersonation_long_call",
            "vulnerable_long_call",
            "repeated_flagged_contact",
        ]

    def test_has_the_timings_and_default_station_of_the_spec(self, settings: Settings) -> None:
        assert (settings.callback.max_attempts, settings.callback.window_s) == (3, 120)
        assert (settings.dispatch.guard_accept_s, settings.dispatch.police_accept_s) == (30, 60)
        assert settings.service.default_station == "PS-YJ"

    def test_units_keep_the_order_of_units_csv(self, settings: Settings) -> None:
        assert [u.id for u in settings.guards_by_estate["E-YJ-CH"]] == ["G-YJ-CH-01", "G-YJ-CH-02"]
        assert [u.id for u in settings.police_by_station["PS-YJ"]] == ["P-YJ-01", "P-YJ-02"]

    def test_the_summary_fits_on_a_screen_and_names_every_rule(self, settings: Settings) -> None:
        summary = settings.summary()
        assert len(summary.splitlines()) < 25
        for rule in settings.rules:
            assert rule.id in summary


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


@pytest.mark.parametrize(
    ("edit", "files", "expected"),
    [
        pytest.param(
            lambda t: t.replace("[callback]", "[callback]\nretries = 3"),
            {},
            ["hengnan.toml: callback.retries: unknown key"],
            id="an unknown key",
        ),
        pytest.param(
            lambda t: t.replace("max_attempts = 3", "max_attempts = 0"),
            {},
            ["hengnan.toml: callback.max_attempts: Input should be greater than or equal to 1"],
            id="an out-of-range value",
        ),
        pytest.param(
            lambda t: t.replace(
                "session_hours = 12", 'session_hours = 12\ntrusted_proxies = ["nginx"]'
            ),
            {},
            [
                "hengnan.toml: console.trusted_proxies: 'nginx' is not an IP "
                "address or network (e.g. '10.0.0.5', '10.0.0.0/24')"
            ],
            id="a proxy that is not an address",
        ),
        pytest.param(
            lambda t: t.replace("window_s = 120", 'window_s = "two minutes"'),
            {},
            ["hengnan.toml: callback.window_s: Input should be a valid number"],
            id="a value of the wrong type",
        ),
        pytest.param(
            lambda t: t.replace('"mqtt://127.0.0.1:1883"', '"mqtt://a:1883,mqtts://b:8883"'),
            {},
            [
                "hengnan.toml: service.broker: broker URLs 'mqtt://a:1883,mqtts://b:8883': "
                "mix mqtt:// and mqtts://; use one for all"
            ],
            id="a broker list half encrypted",
        ),
        pytest.param(
            lambda t: t.replace('"mqtt://127.0.0.1:1883"', '["mqtt://a:1883", "mqtt://b:18x3"]'),
            {},
            ["hengnan.toml: service.broker: broker URL 'mqtt://b:18x3': the port is not a number"],
            id="a broker list with a bad port",
        ),
        pytest.param(
            lambda t: t.replace('"mqtt://127.0.0.1:1883"', "[]"),
            {},
            ["hengnan.toml: service.broker: must be a broker URL or a non-empty list of them"],
            id="an empty broker list",
        ),
        pytest.param(
            lambda t: t.replace('default_station = "PS-YJ"', 'default_station = "PS-X"'),
            {},
            ["hengnan.toml: service.default_station: unknown station 'PS-X'"],
            id="an unknown default station",
        ),
        pytest.param(
            lambda t: t.replace('id = "long_call_flagged"', 'id = "flagged_call_watch"'),
            {},
            ["hengnan.toml: rules[1].id: duplicate rule id 'flagged_call_watch'"],
            id="a duplicate rule id",
        ),
        pytest.param(
            lambda t: t.replace('categories = ["impersonation"]', 'categories = ["impersonaton"]'),
            {},
            [
                "hengnan.toml: rules[2] (impersonation_long_call).when.categories: "
                "'impersonaton' is no category"
            ],
            id="a rule naming a category no flagged number has",
        ),
        pytest.param(
            lambda t: t.replace("min_duration_s = 30", "min_duration = 30"),
            {},
            ["hengnan.toml: rules[0] (flagged_call_watch).when.min_duration: unknown key"],
            id="a misspelt rule condition",
        ),
        pytest.param(
            lambda t: t.replace('severity = "warning"', 'severity = "urgent"', 1),
            {},
            [
                "hengnan.toml: rules[0] (flagged_call_watch).severity: "
                "Input should be 'warning' or 'critical'"
            ],
            id="an unknown severity",
        ),
        pytest.param(
            None,
            {
                "units": UNITS_HEADER + "G-1,guard,radio,E-YJ-CH,,PS-YJ,a\n"
                "G-1,guard,radio,E-YJ-CH,,PS-YJ,b\n"
            },
            ["units.csv:3: id: duplicate id 'G-1' (first on line 2)"],
            id="a duplicate unit id",
        ),
        pytest.param(
            None,
            {"units": UNITS_HEADER + "G-1,guard,radio,E-NOWHERE,,PS-YJ,a\n"},
            ["units.csv:2: estate: unknown estate 'E-NOWHERE'"],
            id="a unit of an estate that does not exist",
        ),
        pytest.param(
            None,
            {"units": UNITS_HEADER + "P-1,police,app,,,PS-NOWHERE,a\n"},
            ["units.csv:2: station: unknown station 'PS-NOWHERE'"],
            id="a unit of a station that does not exist",
        ),
        pytest.param(
            None,
            {"units": UNITS_HEADER + "W-1,grid_worker,app,,ZZ-99,PS-YJ,a\n"},
            ["units.csv:2: grid: unknown grid 'ZZ-99'"],
            id="a grid worker of a grid that does not exist",
        ),
        pytest.param(
            None,
            {"units": UNITS_HEADER + "X-1,drone,app,,,PS-YJ,a\n"},
            ["units.csv:2: kind: 'drone' is not guard, police, quick_police or grid_worker"],
            id="an unknown unit kind",
        ),
        pytest.param(
            None,
            {"units": "id,kind,estate\n"},
            [
                "units.csv:1: header is id,kind,estate; expected "
                "id,kind,channel,estate,grid,station,name"
            ],
            id="a CSV with the wrong header",
        ),
        pytest.param(
            None,
            {"units": UNITS_HEADER + "G-1,guard,radio\n"},
            ["units.csv:2: has 3 fields; expected 7"],
            id="a short CSV row",
        ),
        pytest.param(
            None,
            {
                "subscribers": "msisdn,name,display_name,estate,address,grid,"
                "vulnerable\n+8613800000009,a,b,E-GONE,x,YJ-07,false\n"
            },
            ["subscribers.csv:2: estate: unknown estate 'E-GONE'"],
            id="a resident of an estate that does not exist",
        ),
        pytest.param(
            None,
            {
                "subscribers": "msisdn,name,display_name,estate,address,grid,"
                "vulnerable\n13800000009,a,b,E-YJ-CH,x,YJ-07,maybe\n"
            },
            [
                "subscribers.csv:2: msisdn: '13800000009' is not an E.164 number",
                "subscribers.csv:2: vulnerable: 'maybe' is not true or false",
            ],
            id="every problem of a row at once",
        ),
        pytest.param(
            None,
            {"flagged_numbers": "pattern,match,category,label\n+85251230001,glob,x,y\n"},
            ["flagged_numbers.csv:2: match: 'glob' is not 'exact' or 'prefix'"],
            id="an unknown match kind",
        ),
        pytest.param(
            lambda t: re.sub(
                r"(?m)^store = .*$", 'store = "postgresql://antifraud:s3cret@db/x"', t
            ),
            {},
            ["hengnan.toml: service.store: the PostgreSQL URL holds a password"],
            id="a password in the PostgreSQL store's URL",
        ),
        pytest.param(
            lambda t: re.sub(r"(?m)^store = .*$", 'store = "postgresql://antifraud@db"', t),
            {},
            ["hengnan.toml: service.store: the PostgreSQL URL names no database"],
            id="a PostgreSQL store's URL without a database",
        ),
        pytest.param(
            lambda t: t.replace("[service]\n", "[service]\nlease_ttl_s = 0.2\n", 1),
            {},
            ["hengnan.toml: service.lease_ttl_s:"],
            id="a lease shorter than a second",
        ),
    ],
)
def test_a_config_error_names_file_key_and_problem(
    deployment: Callable[..., Path],
    edit: Callable[[str], str] | None,
    files: dict[str, str],
    expected: list[str],
) -> None:
    problems = problems_of(deployment(edit_toml=edit, **files))
    for fragment in expected:
        assert any(fragment in p for p in problems), f"{fragment!r} not in {problems}"


def test_a_missing_registry_file_is_named_with_the_key_that_names_it(
    deployment: Callable[..., Path],
) -> None:
    toml = deployment(edit_toml=lambda t: t.replace("hengnan/units.csv", "hengnan/nope.csv"))
    assert any(
        p.startswith(f"{toml}: registries.units: ")
        and p.endswith(
            "nope.csv: file not found (the paths of [registries] are relative to "
            "the deployment's file)"
        )
        for p in problems_of(toml)
    ), problems_of(toml)


def test_a_guard_of_another_station_than_his_estates_is_refused(
    deployment: Callable[..., Path],
) -> None:
    """A guard works at his estate: a station in units.csv other than the estate's is a
    typo in one of the two files."""
    units = (Path(__file__).parent.parent / "config" / "hengnan" / "units.csv").read_text(
        encoding="utf-8"
    )
    wrong = units.replace(
        "G-YJ-CH-02,guard,radio,E-YJ-CH,,PS-YJ,", "G-YJ-CH-02,guard,radio,E-YJ-CH,,PS-ST,"
    )
    assert wrong != units
    problems = problems_of(deployment(units=wrong))
    expected = "units.csv:3: station: 'PS-ST' is not the station of the guard's estate 'E-YJ-CH'"
    assert any(expected in p and "('PS-YJ', in " in p for p in problems), problems


def test_toml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[service\n", encoding="utf-8")
    assert "bad.toml: not valid TOML" in problems_of(bad)[0]


class TestCheckConfigCommand:
    def test_prints_the_summary_and_exits_0(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", "config/hengnan.toml"]) == 0
        out = capsys.readouterr().out
        assert "OK" in out and "long_call_flagged" in out

    def test_prints_every_problem_and_exits_1(
        self, deployment: Callable[..., Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        toml = deployment(
            edit_toml=lambda t: t.replace("[callback]", "[callback]\nretries = 3"),
            units=UNITS_HEADER + "G-1,guard,radio,E-NOWHERE,,PS-YJ,a\n",
        )
        assert main(["check-config", str(toml)]) == 1
        err = capsys.readouterr().err
        assert "callback.retries: unknown key" in err
        assert "units.csv:2: estate: unknown estate 'E-NOWHERE'" in err


def test_one_run_lists_every_problem_of_every_stage(deployment: Callable[..., Path]) -> None:
    """A key that is not allowed, a rule naming a category nobody has, a bad registry row
    and an unknown default station: all four in one run, each rule named by its id."""

    def edit(text: str) -> str:
        text = text.replace("[callback]", "[callback]\nretries = 3")
        text = text.replace('categories = ["impersonation"]', 'categories = ["impersonaton"]')
        return text.replace('default_station = "PS-YJ"', 'default_station = "PS-X"')

    problems = problems_of(
        deployment(
            edit_toml=edit,
            flagged_numbers="pattern,match,category,label\n+85251230001,glob,impersonation,y\n"
            "+85251230002,exact,investment,z\n",
        )
    )
    for fragment in (
        "hengnan.toml: callback.retries: unknown key",
        "hengnan.toml: rules[2] (impersonation_long_call).when.categories: 'impersonaton'",
        "flagged_numbers.csv:2: match: 'glob' is not 'exact' or 'prefix'",
        "hengnan.toml: service.default_station: unknown station 'PS-X'",
    ):
        assert any(fragment in p for p in problems), f"{fragment!r} not in {problems}"


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("units", "units"),
        ("estates", "estates"),
        ("subscribers", "subscribers"),
        ("flagged_numbers", "flagged numbers"),
    ],
)
def test_a_registry_with_a_header_and_no_rows_is_refused(
    deployment: Callable[..., Path], name: str, what: str
) -> None:
    source = Path(__file__).parents[1] / "config" / "hengnan" / f"{name}.csv"
    header = source.read_text(encoding="utf-8").splitlines()[0] + "\n"
    problems = problems_of(deployment(**{name: header}))
    assert any(f"{name}.csv: no {what}: the file has a header and no rows" in p for p in problems)
