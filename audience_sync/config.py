"""config.yaml: parsed once, validated into frozen objects, passed down as values."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from audience_sync import builder
from audience_sync.config_yaml import load_yaml
from audience_sync.errors import ConfigError
from audience_sync.keys import check_key, derive_key, reserved_key_reason

DEFAULT_CONFIG = "config.yaml"
CONFIG_ENV = "AUDIENCE_SYNC_CONFIG"

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
               "hour": 3600}
# `${VAR}`, or `${VAR:-default}`: the default when VAR is unset or empty, as in a shell.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Every duration is bounded before it becomes a timedelta: `99999999999d` or `.inf` used to
# validate and then raise OverflowError in every sync (a datetime plus the cadence). A year
# is longer than any cadence, timeout or retention this tool has a use for.
MAX_DURATION = timedelta(days=365)
# Rule windows look back further (a yearly buyer, "not seen in two years"), and `now - window`
# must stay a datetime.
MAX_WINDOW = timedelta(days=36500)
# A rate between one request an hour (the slowest unit) and far above any vendor's limit.
MIN_RATE_PER_SECOND = 1 / 3600
MAX_RATE_PER_SECOND = 100_000.0
# Counts in rules are bound SQL parameters; SQLite refuses integers past 2**63.
MAX_COUNT = 1_000_000_000


def parse_duration(value: object, maximum: timedelta = MAX_DURATION) -> timedelta:
    """`30s`, `15m`, `2h`, `30d` (a bare number is seconds), at most `maximum`."""
    if isinstance(value, timedelta):
        seconds: float = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 2h or 30d")
    elif isinstance(value, int):
        seconds = value  # compared as an int: a 400-digit number has no float
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("expected a duration such as 30s, 15m, 2h or 30d, "
                             "not an infinite or NaN number")
        seconds = value
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{_shown(value)} is not a duration such as 30s, 15m, 2h or 30d")
        digits = match.group(1)
        # Compare before converting: int() refuses more than 4300 digits with its own message.
        seconds = (math.inf if len(digits) > 15 else int(digits) * _UNITS[match.group(2)])
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > maximum.total_seconds():
        raise ValueError(f"is longer than the maximum of {maximum.days}d")
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def _shown(value: object) -> str:
    """A user's value quoted in a message, cut short: a 5 MB line is not a useful error."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _parse_window(value: object) -> timedelta:
    return parse_duration(value, MAX_WINDOW)


Window = Annotated[timedelta, BeforeValidator(_parse_window)]


def clean_secret(value: object) -> object:
    """Strip surrounding whitespace; refuse control characters inside.

    A file-mounted secret ends in a newline, which made httpx refuse the header and print the
    whole token in its error. A control character inside is never part of a real token, and
    refusing it here keeps it out of every header. The message never contains the value.
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value  # pydantic reports the wrong type (without echoing the value)
    value = value.strip()
    if not value:
        raise ValueError("is empty")
    for char in value:
        if not char.isprintable() and char != " ":
            raise ValueError(f"contains the control character U+{ord(char):04X}; "
                             "a secret must be one line of printable characters")
    return value


Secret = Annotated[SecretStr, BeforeValidator(clean_secret)]


@dataclass(frozen=True)
class RateLimit:
    """`count` requests per `per_seconds`."""

    count: float
    per_seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.per_seconds

    def __str__(self) -> str:
        return f"{self.count:g}/{self.per_seconds:g}s"


def parse_rate(value: object) -> RateLimit:
    if isinstance(value, RateLimit):
        return value
    match = _RATE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{_shown(value)} is not a rate such as 100/s or 200/min")
    rate = RateLimit(float(match.group(1)), float(_RATE_UNITS[match.group(2)]))
    # float("9" * 400) is inf; a rate far below one an hour would park a drain for ages.
    if not MIN_RATE_PER_SECOND <= rate.per_second <= MAX_RATE_PER_SECOND:
        raise ValueError(f"{_shown(value)} is outside 1/hour .. {MAX_RATE_PER_SECOND:g}/s")
    return rate


Rate = Annotated[RateLimit, BeforeValidator(parse_rate)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Schedule(_Frozen):
    every: Duration = timedelta(hours=2)
    jitter: Duration = timedelta(minutes=10)
    tick: Duration = timedelta(seconds=30)
    max_removal_fraction: float = Field(default=0.5, gt=0, le=1)

    @field_validator("every", "tick")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be longer than 0s")
        return value


class ScheduleOverride(_Frozen):
    every: Duration | None = None
    jitter: Duration | None = None
    max_removal_fraction: float | None = Field(default=None, gt=0, le=1)

    @field_validator("every")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value.total_seconds() <= 0:
            raise ValueError("must be longer than 0s")
        return value


class Tables(_Frozen):
    tracks: str = "tracks"
    users: str = "users"
    # Event tables that do not follow Segment's naming (`Order Completed` -> order_completed).
    events: dict[str, str] = Field(default_factory=dict)


class Columns(_Frozen):
    """Column names of Segment's warehouse schema, renamable per source."""

    user_id: str = "user_id"
    event: str = "event"
    timestamp: str = "timestamp"
    users_id: str = "id"
    email: str = "email"
    name: str = "name"
    title: str = "title"


class Source(_Frozen):
    url: str
    # The schema holding Segment's tables (`analytics`), for rule: audiences; a table named
    # `schema.table` in `tables:` keeps its own.
    db_schema: str | None = Field(default=None, alias="schema", min_length=1)
    tables: Tables = Tables()
    columns: Columns = Columns()
    # SQL returning `user_id, group_id`: the users of each account, for account audiences
    # fanned out to users (`accounts: identify | track`). `:now` is bound as in definitions.
    account_users: str | None = Field(default=None, min_length=1)

    @field_validator("account_users")
    @classmethod
    def _account_users(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)


class Events(_Frozen):
    """Track event names (Engage's by default), renamable per destination."""

    entered: str = Field(default="Audience Entered", min_length=1, max_length=200)
    exited: str = Field(default="Audience Exited", min_length=1, max_length=200)
    trait: str = Field(default="Trait Computed", min_length=1, max_length=200)


Call = Literal["identify", "track"]
# How a destination receives an account audience: one group call per account, the identify or
# track call fanned out to the account's users, or (Planhat, mode api) company fields.
AccountCall = Literal["group", "identify", "track", "companies"]


class _Calls(_Frozen):
    """What every destination takes: the calls it is sent and their event names."""

    send: list[Call] = Field(default_factory=lambda: list[Call](["identify"]), min_length=1)
    events: Events = Events()
    # Account audiences (`level: account`); None: the destination's default (account_call).
    accounts: AccountCall | None = None

    def account_call(self) -> AccountCall:
        """What an account audience's change becomes here: its `accounts:`, else group."""
        return self.accounts or "group"

    @model_validator(mode="after")
    def _accounts(self) -> _Calls:
        if self.accounts == "companies":
            raise ValueError("accounts: companies is for type planhat in mode api "
                             "(use group, identify or track)")
        return self

    @field_validator("send")
    @classmethod
    def _send(cls, value: list[Call]) -> list[Call]:
        if len(set(value)) != len(value):
            raise ValueError("lists a call twice")
        # Always in the order a change yields them: identify, then track.
        order: tuple[Call, ...] = ("identify", "track")
        return [call for call in order if call in value]


class _HttpConfig(_Calls):
    base_url: str | None = None
    timeout: Duration = timedelta(seconds=30)
    max_retries: int = Field(default=5, ge=0, le=50)
    concurrency: int = Field(default=4, ge=1, le=64)
    # Exponential backoff between attempts within one drain (seconds): base * 2**n, capped,
    # with jitter. A Retry-After longer than backoff_max defers the delivery instead.
    backoff_base: float = Field(default=0.5, gt=0, le=60)
    backoff_max: float = Field(default=30.0, gt=0, le=3600)
    # When the attempts of one drain run out, the delivery waits this long for the next drain.
    retry_later: Duration = timedelta(minutes=1)
    # The longest a server's Retry-After may defer a delivery (a longer one is cut to this).
    max_defer: Duration = timedelta(hours=1)

    @field_validator("max_defer")
    @classmethod
    def _max_defer(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(days=7):
            raise ValueError("must be between 1s and 7d")
        return value

    @field_validator("base_url", "analytics_base_url", check_fields=False)
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value


class PlanhatConfig(_HttpConfig):
    type: Literal["planhat"]
    mode: Literal["segment", "api"] = "segment"
    tenant_token: Secret | None = None
    api_token: Secret | None = None
    subdomain: str = "api"
    # The analytics host (user activities, mode api with send: track); tests point it at a
    # local server.
    analytics_base_url: str | None = None
    rate_limit: Rate | None = None
    batch_size: int = Field(default=5000, ge=1, le=5000)
    # Mode api: create a missing end-user custom field before the first upsert of its key;
    # false: a missing field is a `check` error and its deliveries wait.
    create_fields: bool = True

    @field_validator("subdomain")
    @classmethod
    def _subdomain(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", value):
            raise ValueError("must be a host label such as api, api-eu or analytics")
        return value

    def account_call(self) -> AccountCall:
        return self.accounts or ("companies" if self.mode == "api" else "identify")

    # Named as _Calls._accounts, so it replaces that check: Planhat takes companies (mode api)
    # and refuses group calls.
    @model_validator(mode="after")
    def _accounts(self) -> PlanhatConfig:
        if self.accounts == "group":
            raise ValueError("accounts: group: Planhat ignores group calls; use identify or "
                             "track (fanned out to the account's users)"
                             + (" or companies" if self.mode == "api" else ""))
        if self.accounts == "companies" and self.mode != "api":
            raise ValueError("accounts: companies needs mode api (Planhat's REST API); in mode "
                             "segment use identify or track")
        return self

    @model_validator(mode="after")
    def _tokens(self) -> PlanhatConfig:
        if self.mode == "segment" and not self.tenant_token:
            raise ValueError("tenant_token is required in mode segment")
        if self.mode == "api" and not self.api_token:
            raise ValueError("api_token is required in mode api")
        if self.mode == "api" and "track" in self.send and not self.tenant_token:
            raise ValueError("tenant_token is required in mode api with send: track "
                             "(activities go to the analytics host under the tenant token)")
        return self

    @property
    def url(self) -> str:
        return self.base_url or f"https://{self.subdomain}.planhat.com"

    @property
    def analytics_url(self) -> str:
        return self.analytics_base_url or "https://analytics.planhat.com"

    @property
    def effective_rate_limit(self) -> RateLimit:
        if self.rate_limit is not None:
            return self.rate_limit
        # Planhat: hard limit 150 req/s; soft quota 200 calls/min for its REST API.
        return RateLimit(100, 1) if self.mode == "segment" else RateLimit(200, 60)


class SegmentConfig(_HttpConfig):
    type: Literal["segment"]
    write_key: Secret
    base_url: str | None = "https://api.segment.io"
    rate_limit: Rate = RateLimit(500, 1)
    # Segment's own libraries post one batch at a time. Two on the wire overlap building and
    # recording one batch with the other's round trip; more mostly queue at the endpoint
    # (bench/bench_delivery.py measured 0.87 of the bare loop with two, 0.79 with four).
    concurrency: int = Field(default=2, ge=1, le=64)

    @property
    def url(self) -> str:
        return self.base_url or "https://api.segment.io"


class JsonlConfig(_Calls):
    type: Literal["jsonl"]
    path: str


DestinationConfig = Annotated[
    PlanhatConfig | SegmentConfig | JsonlConfig, Field(discriminator="type")
]


class Rule(_Frozen):
    """Engage-style event rule: performed EVENT at least N times within D (or not at all)."""

    event: str = Field(min_length=1)
    within: Window
    at_least: int = Field(default=1, ge=1, le=MAX_COUNT)
    at_most: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    not_performed: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> Rule:
        if self.within.total_seconds() <= 0:
            raise ValueError("within must be longer than 0s")
        if self.at_most is not None and self.at_most < self.at_least and not self.not_performed:
            raise ValueError("at_most is smaller than at_least")
        return self


Level = Literal["user", "account"]


class _ComputationModel(_Frozen):
    name: str = Field(min_length=1)
    key: str | None = None
    source: str
    destinations: list[str] = Field(min_length=1)
    # account: the definition returns group_id (and optional account traits such as name,
    # and a user_id for group calls); membership is keyed by account.
    level: Level = "user"
    schedule: ScheduleOverride = ScheduleOverride()
    # false: kept in config and in the state store, but never run (nor shown as orphaned).
    enabled: bool = True

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return None if value is None else check_key(value)


class AudienceModel(_ComputationModel):
    query: str | None = None
    rule: Rule | None = None
    where: Any = None  # builder conditions, parsed in _build where their paths are known

    @model_validator(mode="after")
    def _one_definition(self) -> AudienceModel:
        if [self.query, self.rule, self.where].count(None) != 2:
            raise ValueError("give exactly one of query, rule or where")
        if self.query is not None and not self.query.strip():
            raise ValueError("query is empty")
        if self.level == "account" and self.query is None:
            raise ValueError("an account audience (level: account) is defined by a query "
                             "returning group_id (rule and where select users)")
        return self


class TraitModel(_ComputationModel):
    query: str | None = Field(default=None, min_length=1)
    compute: Any = None  # a computed-trait template, parsed in _build

    @model_validator(mode="after")
    def _one_definition(self) -> TraitModel:
        if (self.query is None) == (self.compute is None):
            raise ValueError("give exactly one of query or compute")
        if self.level == "account" and self.query is None:
            raise ValueError("an account trait (level: account) is defined by a query "
                             "returning group_id and value (compute reads users' events)")
        return self


AlertEvent = Literal["failed", "held", "recovered", "size_change", "deliveries_failed"]
ALERT_EVENTS: tuple[AlertEvent, ...] = ("failed", "held", "recovered", "size_change",
                                        "deliveries_failed")


class AlertConfig(_Frozen):
    """One alert target: a webhook POSTed a JSON body Slack's incoming webhooks accept."""

    type: Literal["webhook"]
    url: Secret  # a Slack hook's path is its secret: never printed, not even masked
    on: list[AlertEvent] = Field(default_factory=lambda: list(ALERT_EVENTS), min_length=1)
    failures: int = Field(default=1, ge=1, le=1000)
    threshold: float = Field(default=0.2, gt=0, le=100)
    timeout: Duration = timedelta(seconds=5)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 reads an unquoted `on:` key as the boolean true.
        if isinstance(data, dict) and True in data:
            data = dict(data)
            if "on" in data:
                raise ValueError("`on` is given twice")
            data["on"] = data.pop(True)
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        if not re.match(r"^https?://[^\s/]+", value.get_secret_value()):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=0) < value <= timedelta(seconds=60):
            raise ValueError("must be between 1s and 60s")
        return value

    @property
    def target(self) -> str:
        """A stable name for this entry in the state store: a hash, never the URL."""
        body = json.dumps([self.url.get_secret_value(), sorted(self.on), self.failures,
                           self.threshold])
        return hashlib.sha256(body.encode()).hexdigest()[:32]


class ConfigModel(_Frozen):
    state_db: str = "sqlite:///audience_sync.db"
    # context.personas.space_id of every message; by default the state store's own id.
    space: str | None = Field(default=None, min_length=1, max_length=100,
                              pattern=r"^[A-Za-z0-9_.-]+$")
    schedule: Schedule = Schedule()
    sources: dict[str, Source] = Field(default_factory=dict)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    audiences: list[AudienceModel] = Field(default_factory=list)
    computed_traits: list[TraitModel] = Field(default_factory=list)
    # The dashboard's token (`audience-sync ui`, the daemon's health port): required to bind
    # it to a non-loopback address.
    ui_token: Secret | None = None
    alerts: list[AlertConfig] = Field(default_factory=list)
    # Sent and superseded deliveries older than this are pruned, daily by the daemon.
    retention: Duration = timedelta(days=30)

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: timedelta) -> timedelta:
        if value < timedelta(days=1):
            raise ValueError("must be at least 1d")
        return value

    @field_validator("state_db")
    @classmethod
    def _state_db(cls, value: str) -> str:
        url = _check_url(value)
        if make_url(url).get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("the state database must be SQLite or PostgreSQL")
        return url


@dataclass(frozen=True)
class Computation:
    """One audience or computed trait, with its schedule resolved."""

    kind: Literal["audience", "trait"]
    key: str
    name: str
    source_name: str
    source: Source
    destinations: tuple[str, ...]
    query: str | None
    rule: Rule | None
    every: timedelta
    jitter: timedelta
    max_removal_fraction: float
    path: str
    # A `where:` audience (references inlined) or a `compute:` trait.
    definition: builder.Definition | None = None
    # (destination, call) per outbox row a change yields, from each destination's `send:`;
    # empty: an identify for each destination.
    calls: tuple[tuple[str, str], ...] = ()
    enabled: bool = True
    # account: members are accounts; `calls` then holds "group" for the destinations sent one
    # call per account (group calls, Planhat companies) and identify/track for those the
    # change is fanned out to, user by user (the source's account_users).
    level: Level = "user"

    @property
    def outbox_calls(self) -> tuple[tuple[str, str], ...]:
        return self.calls or tuple((name, "identify") for name in self.destinations)

    @property
    def fanned_out(self) -> bool:
        """An account computation some destination receives user by user."""
        return self.level == "account" and any(call != "group" for _, call in self.outbox_calls)

    @property
    def definition_hash(self) -> str:
        body: dict[str, Any] = {"kind": self.kind, "query": self.query,
                                "rule": self.rule.model_dump(mode="json") if self.rule else None,
                                "source": self.source_name}
        if self.level != "user":
            body["level"] = self.level
        if self.definition is not None:
            body["definition"] = builder.to_plain(self.definition)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Config:
    path: Path
    model: ConfigModel
    computations: tuple[Computation, ...]  # the enabled ones: what runs
    disabled: tuple[Computation, ...] = ()  # `enabled: false`: kept, not run, not orphaned

    @property
    def state_db(self) -> str:
        return self.model.state_db

    @property
    def schedule(self) -> Schedule:
        return self.model.schedule

    @property
    def destinations(self) -> Mapping[str, PlanhatConfig | SegmentConfig |
                                      JsonlConfig]:
        return self.model.destinations

    @property
    def sources(self) -> Mapping[str, Source]:
        return self.model.sources

    @property
    def space(self) -> str | None:
        return self.model.space

    @property
    def ui_token(self) -> str | None:
        token = self.model.ui_token
        return token.get_secret_value() if token is not None else None

    @property
    def alerts(self) -> list[AlertConfig]:
        return self.model.alerts

    @property
    def retention(self) -> timedelta:
        return self.model.retention

    @property
    def known_keys(self) -> set[str]:
        """Every key the config names, enabled or not (the others are orphans)."""
        return {c.key for c in (*self.computations, *self.disabled)}

    def find(self, name_or_key: str) -> Computation:
        wanted = name_or_key.strip()
        for comp in self.computations:
            if wanted == comp.key or wanted.casefold() == comp.name.casefold():
                return comp
        for comp in self.disabled:
            if wanted == comp.key or wanted.casefold() == comp.name.casefold():
                raise ConfigError(f"{comp.path}.enabled",
                                  f"{comp.key} is disabled (enabled: false); it is not run")
        raise ConfigError("", f"no audience or computed trait named {name_or_key!r} in config")


def _check_url(value: str) -> str:
    try:
        make_url(value)
    except ArgumentError as exc:
        raise ValueError("is not a valid database URL") from exc
    return value


def _substitute_env(node: Any, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute_env(v, _join(path, str(k)), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None:
                return env.get(name) or default
            if name not in env:
                raise ConfigError(path, f"environment variable {name} is not set")
            return env[name]

        return _ENV_REF.sub(replace, node)
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("planhat", "segment", "jsonl") and out.startswith("destinations."):
            # pydantic adds the discriminator tag to the location; it is not a field.
            continue
        else:
            out = _join(out, part)
    return out


def _resolve_sqlite(url: str, base: Path) -> str:
    parsed: URL = make_url(url)
    database = parsed.database
    # Relative file paths (SQLite, DuckDB) are relative to the config file, not the cwd.
    if parsed.get_backend_name() not in ("sqlite", "duckdb") or not database \
            or database == ":memory:":
        return url
    if database.startswith("file:"):
        return url
    path = Path(database).expanduser()
    if not path.is_absolute():
        path = (base / path).resolve()
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate config.yaml; every problem is a ConfigError naming the field."""
    env = os.environ if env is None else env
    config_path = Path(path or env.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {config_path} not found") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {config_path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError("", f"{config_path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                              f"on line {line})") from None
    try:
        raw = load_yaml(text)
    except RecursionError:
        raise ConfigError("", f"{config_path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{config_path}: {problem}{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{config_path}: the top level must be a mapping of settings")
    raw = _substitute_env(raw, "", env)
    try:
        model = ConfigModel.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] == "missing":
            message = "is required"
        raise ConfigError(_format_loc(tuple(error["loc"])), message) from None
    return _build(config_path, model)


def _build(config_path: Path, model: ConfigModel) -> Config:
    base = config_path.resolve().parent
    model = model.model_copy(update={
        "state_db": _resolve_sqlite(model.state_db, base),
        "sources": {name: src.model_copy(update={"url": _resolve_sqlite(src.url, base)})
                    for name, src in model.sources.items()},
        "destinations": {
            name: (dest.model_copy(update={"path": str((base / dest.path).resolve())})
                   if isinstance(dest, JsonlConfig) else dest)
            for name, dest in model.destinations.items()
        },
    })
    if not model.audiences and not model.computed_traits:
        raise ConfigError("audiences", "at least one audience or computed trait is required")
    computations: list[Computation] = []
    seen: dict[str, str] = {}
    items: list[tuple[str, _ComputationModel]] = [
        *((f"audiences[{i}]", a) for i, a in enumerate(model.audiences)),
        *((f"computed_traits[{i}]", t) for i, t in enumerate(model.computed_traits)),
    ]
    for path, item in items:
        kind: Literal["audience", "trait"] = "audience" if path.startswith("aud") else "trait"
        if item.key is not None:
            key = item.key
        else:
            try:
                key = derive_key(item.name, prefix=kind)
            except ValueError as exc:
                raise ConfigError(f"{path}.name", str(exc)) from None
        reserved = reserved_key_reason(key)
        if reserved is not None:
            raise ConfigError(f"{path}.key" if item.key else f"{path}.name", reserved)
        if key in seen:
            raise ConfigError(f"{path}.key" if item.key else f"{path}.name",
                              f"key {key!r} is already used by {seen[key]}")
        seen[key] = path
        if item.source not in model.sources:
            raise ConfigError(f"{path}.source", f"unknown source {item.source!r}")
        for j, dest in enumerate(item.destinations):
            if dest not in model.destinations:
                raise ConfigError(f"{path}.destinations[{j}]", f"unknown destination {dest!r}")
        if len(set(item.destinations)) != len(item.destinations):
            raise ConfigError(f"{path}.destinations", "lists a destination twice")
        override = item.schedule
        calls = _calls(item, path, model)
        computations.append(Computation(
            kind=kind,
            key=key,
            name=item.name,
            source_name=item.source,
            source=model.sources[item.source],
            destinations=tuple(item.destinations),
            query=item.query if isinstance(item, AudienceModel | TraitModel) else None,
            rule=item.rule if isinstance(item, AudienceModel) else None,
            every=override.every or model.schedule.every,
            jitter=override.jitter if override.jitter is not None else model.schedule.jitter,
            max_removal_fraction=(override.max_removal_fraction
                                  or model.schedule.max_removal_fraction),
            path=path,
            definition=_definition(item, path),
            calls=calls,
            enabled=item.enabled,
            level=item.level,
        ))
    # A disabled audience may still be referenced (`audience: KEY`) by an enabled one.
    computations = _inline_audiences(computations, model)
    return Config(path=config_path, model=model,
                  computations=tuple(c for c in computations if c.enabled),
                  disabled=tuple(c for c in computations if not c.enabled))


def _calls(item: _ComputationModel, path: str,
           model: ConfigModel) -> tuple[tuple[str, str], ...]:
    """(destination, call) per outbox row a change yields: each destination's `send:` for a
    user audience; for an account audience "group" (one row per account: group calls, Planhat
    companies) or the identify/track fanned out to the users of the source's account_users."""
    if item.level == "user":
        return tuple((name, call) for name in item.destinations
                     for call in model.destinations[name].send)
    calls = []
    for j, name in enumerate(item.destinations):
        call = model.destinations[name].account_call()
        if call in ("identify", "track") and model.sources[item.source].account_users is None:
            raise ConfigError(f"{path}.destinations[{j}]", (
                f"destination {name!r} sends account audiences to the account's users "
                f"(accounts: {call}), which needs account_users: on source {item.source!r} "
                "(a query returning user_id, group_id)"))
        calls.append((name, "group" if call in ("group", "companies") else call))
    return tuple(calls)


def _definition(item: _ComputationModel, path: str) -> builder.Definition | None:
    try:
        if isinstance(item, AudienceModel) and item.where is not None:
            return builder.parse_where(item.where, f"{path}.where")
        if isinstance(item, TraitModel) and item.compute is not None:
            return builder.parse_compute(item.compute, f"{path}.compute")
    except builder.DefinitionError as exc:
        raise ConfigError(exc.path, exc.message) from None
    return None


def _inline_audiences(computations: list[Computation], model: ConfigModel) -> list[Computation]:
    """Replace `audience:` references by the definitions they name; cycles are errors."""
    audiences = []
    for comp in computations:
        if comp.kind != "audience":
            continue
        condition: builder.Condition | None = None
        if isinstance(comp.definition, builder.Group):
            condition = comp.definition
        elif comp.rule is not None:
            rule = comp.rule
            condition = builder.rule_condition(rule.event, rule.within, rule.at_least,
                                               rule.at_most, rule.not_performed)
        audiences.append(builder.Audience(comp.key, comp.name, comp.path, comp.source_name,
                                          condition, comp.query, comp.level == "account"))
    try:
        inlined = builder.inline_references(audiences)
    except builder.DefinitionError as exc:
        raise ConfigError(exc.path, exc.message) from None
    resolved = []
    for comp in computations:
        if isinstance(comp.definition, builder.Group):
            where = inlined[comp.key]
            assert isinstance(where, builder.Group)  # inlining keeps the top-level group
            comp = replace(comp, definition=where)
        resolved.append(comp)
    return resolved
