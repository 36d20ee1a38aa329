"""The operator console: a web page for the anti-fraud center, live over MQTT.

The console is an operator client like any other (docs/protocol.md): it reads incidents from
``operators/incidents`` and the retained ``incidents/+``, unit presence from the retained
``units/+/status``, refusals from the dead-letter topic, and publishes each operator's actions
on ``operators/{operator}/actions`` with CloudEvent source ``console/{operator}``. Browsers get
the board over a WebSocket; history comes from the dispatcher's store, read-only.

Operators log in with a password (scrypt-hashed in ``console.users_file``); sessions are
random tokens in an HttpOnly, SameSite=Strict cookie, and every action must carry the
session's CSRF token. Every asset is served from here: no internet is needed.

Whoever holds one party's credentials (a handset's, an operator's) can at most spoil that
party's own messages: every message read is checked against the published protocol before it
reaches the board, presence is shown as the dispatcher accepted it, logins are throttled and
hashed off the event loop, requests from other origins are refused, and a slow browser is
dropped rather than waited for (docs/RELIABILITY.md, "Console").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import hmac
import io
import ipaddress
import json
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import structlog
from aiohttp import WSMsgType, web
from pydantic import ValidationError

from adapters.mqtt import Backoff, BrokerURL, node_of, open_client, publish_acknowledged
from adapters.reading import READ_ERRORS, STORE_READ_ERRORS, StoreRef
from adapters.stats import read_store
from adapters.stats_report import charts
from adapters.store import stored_timeline
from dispatcher.errors import BrokerError, InputError
from dispatcher.inbound import (
    INCIDENT_ID_RE,
    TopicRouter,
    cloudevent,
    decode_payload,
    parse_message,
)
from dispatcher.model import Incident
from dispatcher.outbound import Messages, Topics
from dispatcher.outcomes import behind, figures
from dispatcher.protocol import OUTBOUND_EVENTS
from dispatcher.settings import Settings
from dispatcher.texts import OUTCOME_TEXT

log = structlog.get_logger("console")

STATIC = Path(__file__).resolve().parent / "console_static"
COOKIE = "antifraud_session"
ACTION_CONFIRM_S = 5.0  # how long an action may wait for the broker to confirm it
UNCONFIRMED = "与消息服务器的连接中断，无法确认操作已送达：请看事件状态是否已变，再决定是否重做"
ACTIONS = {
    "callback": {"result": ("no_answer", "busy", "answered_safe", "answered_at_risk")},
    "escalate": {},
    "close": {"outcome": ("prevented", "loss", "false_alarm", "unreachable")},
    "acknowledge": {},  # and ``alerts``: the dead ends taken on, checked below
}
NOTE_CHARS = 2000  # the dispatcher's limit for a closing note
MAX_BODY_BYTES = 64 * 1024  # any request body: actions and the login form are a few hundred
MAX_FEED_BYTES = 1 << 20  # an incident document off the broker (production allows 256 KiB)
MAX_FEED_DEPTH = 32
MAX_CLOSED_SHOWN = 500  # closed incidents kept in memory for the board
VIEWER_QUEUE = 1000  # frames a browser may fall behind before it is dropped
PENDING_ACTIONS = 1000  # action ids kept per operator to match their refusals
VIEWER_SEND_S = 10.0  # longest a browser may take to take one frame
SWEEP_S = 1.0  # how often sessions are checked against the users file and their expiry
OPERATOR_WAIT_CAP_S = 30.0  # the longest failures elsewhere can make an operator wait
PRESENCE_POLL_S = 1.0  # how often presence is read from the store when nothing is heard
HASH_THREADS = 2  # password hashing runs on these threads, never on the event loop
HASH_WAITING = 32  # logins waiting for a hashing thread before more are turned away
OPERATOR_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OUTCOMES = ("prevented", "loss", "false_alarm", "unreachable", "resolved_by_callback")
ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

# A dead end (IncidentDetail.alerts) as an operator acts on it: who could not be reached, and
# what to do now. One text per code; a code this console does not know still alarms.
ALERT_TEXT = {
    "door_exhausted": (
        "无人可上门：可派的保安（村里为网格员）与快警均未接警，请电话联系派出所安排上门"
    ),
    "police_exhausted": "无民警接警：请用对讲机直接调度民警",
    "arrival_overdue": "接警未到：接警单位迟迟未到达，请电话或对讲机联系核实，必要时另行派员",
    "report_without_arrival": (
        "未到先报：接警单位未报到达就反馈了结果（可能是误按，也可能是对讲机遗失被冒用），"
        "请电话核实是否已上门，必要时另行派员"
    ),
    "report_overdue": "到达未报：接警单位到达后迟迟未反馈结果，请电话或对讲机联系核实现场情况",
    "arrival_too_soon": (
        "到达过快：接警单位刚接警就报了到达（可能是误按，也可能是对讲机遗失被冒用），"
        "请电话核实是否已上门，必要时另行派员"
    ),
    "no_address": "地址不明：请电话核实住址；需出警请点「派民警」",
    "unknown_subscriber": "未登记用户：请电话核实身份和住址；需出警请点「派民警」",
}

# The dispatcher's dead letters give their reason in English (for whoever fixes a sender);
# an operator reads it in Chinese. Matched from the start of the reason; the code is kept.
REFUSAL_TEXT = (
    (re.compile(r"^incident \S+ is closed"), "事件已结案，操作未执行"),
    (re.compile(r"^incident \S+ has no alert "), "事件的警报已变化：请看清后再确认"),
    (re.compile(r"^unknown incident "), "调度服务中没有这个事件（可能已被清除），操作未执行"),
    (re.compile(r"^rate limit: "), "操作过于频繁，调度服务已限流：请稍等几秒再试"),
    (re.compile(r"^(type \S+ is not accepted|unknown type )"), "调度服务不接受这种操作"),
    (re.compile(r"^operator id "), "接线员编号无效，操作未执行"),
    (
        re.compile(r"^(not JSON|not UTF-8|not a CloudEvent|payload is|empty payload|JSON nests)"),
        "操作消息格式无效，调度服务未执行",
    ),
    (
        re.compile(r"^(invalid data|CloudEvent |(data|id|source|type|time|specversion|subject)\b)"),
        "操作内容无效，调度服务未执行",
    ),
)


def refusal_text(reason: str) -> str:
    """The dispatcher's reason for refusing an action, for an operator: Chinese, and for a
    reason not known here a Chinese sentence that still shows the dispatcher's own words."""
    for pattern, text in REFUSAL_TEXT:
        if pattern.match(reason):
            return text
    return f"调度服务拒绝了此操作（原因：{printable(reason, 200)}）"


def printable(text: str, limit: int = 120) -> str:
    """``text`` fit for a log line: cut, and anything that is not valid Unicode escaped."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def neutralise_cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (OWASP: a leading single quote)."""
    return "'" + text if text.startswith(FORMULA_START) else text


# ---- operators and their passwords ----------------------------------------------------------


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        actual = hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


# checked when the operator id is unknown or has no password: the same work either way
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def fingerprint(stored: str) -> str:
    """Stands for one password hash in a session: a new password, a new fingerprint."""
    return hashlib.sha256(stored.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Users:
    """Operator id -> password hash, in a JSON file (mode 0600), re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.items()}

    def current(self) -> dict[str, str]:
        """The users as the file says now (read again only when the file changed)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._users = self.load() if stamp is not None else {}
            except (OSError, ValueError, AttributeError) as exc:
                log.error("console_users_unreadable", path=str(self.path), error=str(exc))
                self._users = {}
            self._stamp = stamp
        return self._users

    def set_password(self, operator: str, password: str) -> None:
        users = self.load()
        users[operator] = hash_password(password)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(users, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.path)

    def verify(self, operator: str, password: str) -> str | None:
        """The fingerprint of the operator's password hash when ``password`` is right, else
        None; an unknown operator costs the same hashing as a wrong password."""
        stored = self.current().get(operator)
        if stored is None:
            check_password(password, _DUMMY_HASH)
            return None
        return fingerprint(stored) if check_password(password, stored) else None

    def check(self, operator: str, password: str) -> bool:
        return self.verify(operator, password) is not None

    def fingerprint_of(self, operator: str) -> str | None:
        stored = self.current().get(operator)
        return None if stored is None else fingerprint(stored)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_address(
    remote: str | None,
    forwarded: list[str],
    proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """The address a login comes from: the connection's own, unless it is one of the
    deployment's ``proxies``; then the nearest hop of ``X-Forwarded-For`` (``forwarded``,
    each header's text) that is not a proxy. What a client writes into the header itself
    lies further left, behind the hop its proxy added, and is never read; a proxy that
    names no one leaves the proxy's own address."""
    own = remote or "unknown"
    if not proxies:
        return own

    def trusted(text: str) -> bool:
        address = _address(text)
        return address is not None and any(address in network for network in proxies)

    if not trusted(own):
        return own
    hops = [hop.strip() for header in forwarded for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not trusted(hop):
            address = _address(hop)
            if address is not None:
                return str(address)
            return "".join(c if c.isprintable() else "?" for c in hop[:64])
    return hops[0] if hops else own


class LoginThrottle:
    """Failed logins per key (an operator id, a client address): ``free`` failures, then each
    further one makes the key wait ``base_s`` doubled per failure, at most ``cap_s``; a key
    quiet for ``forget_s`` starts afresh. At most ``max_keys`` keys, the oldest forgotten."""

    def __init__(
        self,
        free: int,
        base_s: float = 1.0,
        cap_s: float = 900.0,
        forget_s: float = 3600.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.base_s = base_s
        self.cap_s = cap_s
        self.forget_s = forget_s
        self.max_keys = max_keys
        self.clock = clock
        # key -> (failures, locked until, last failure)
        self.entries: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def wait(self, key: str) -> float:
        """Seconds ``key`` must wait before its next try (0: it may try now)."""
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        now = self.clock()
        if now - entry[2] > self.forget_s:
            del self.entries[key]
            return 0.0
        return max(0.0, entry[1] - now)

    def failed(self, key: str) -> None:
        now = self.clock()
        failures, until, _ = self.entries.pop(key, (0, 0.0, now))
        failures += 1
        if failures >= self.free:
            until = now + min(self.cap_s, self.base_s * 2.0 ** min(failures - self.free, 60))
        self.entries[key] = (failures, until, now)
        while len(self.entries) > self.max_keys:
            self.entries.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self.entries.pop(key, None)


@dataclass
class Session:
    operator: str
    csrf: str
    expires: float
    credential: str = ""  # fingerprint of the password hash it was opened with


@dataclass(eq=False)
class Viewer:
    """One browser's live feed: frames wait in a bounded queue, a task of its own sends them."""

    socket: web.WebSocketResponse
    request: web.Request
    token: str
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(VIEWER_QUEUE))
    writer: asyncio.Task[None] | None = None


class Refused(Exception):
    """A message the console does not take, with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- the board ------------------------------------------------------------------------------


class Board:
    """What the consoles show, kept from the MQTT feed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.incidents: dict[str, dict[str, Any]] = {}
        self.presence: dict[str, str] = {}
        # the ids of the actions sent, per operator (at most PENDING_ACTIONS each, the oldest
        # forgotten): one operator's many actions never push out another's
        self.pending: dict[str, OrderedDict[str, None]] = {}

    def units(self) -> list[dict[str, Any]]:
        engaged: dict[str, str] = {}
        for incident in self.incidents.values():
            if incident["status"] == "closed":
                continue
            for d in incident["dispatches"]:
                if d["status"] in ("accepted", "arrived"):
                    engaged[d["unit"]] = incident["incident_id"]
        return [
            {
                "id": u.id,
                "name": u.name,
                "kind": u.kind,
                "station": u.station,
                "estate": u.estate,
                "presence": self.presence.get(u.id, "unknown"),
                "busy": u.id in engaged,
                "incident": engaged.get(u.id),
            }
            for u in sorted(self.settings.units.values(), key=lambda u: u.order)
        ]

    def put(self, incident: dict[str, Any]) -> None:
        self.incidents[incident["incident_id"]] = incident
        closed = [i for i in self.incidents.values() if i["status"] == "closed"]
        if len(closed) > MAX_CLOSED_SHOWN:
            closed.sort(key=lambda i: i["closed_at"] or "")
            for old in closed[: len(closed) - MAX_CLOSED_SHOWN]:
                del self.incidents[old["incident_id"]]

    def snapshot(self) -> dict[str, Any]:
        return {
            "incidents": [i for i in self.incidents.values() if i["status"] != "closed"]
            + sorted(
                (i for i in self.incidents.values() if i["status"] == "closed"),
                key=lambda i: i["closed_at"] or "",
                reverse=True,
            )[:20],
            "units": self.units(),
        }


# ---- the server -----------------------------------------------------------------------------


class Console:
    def __init__(
        self,
        settings: Settings,
        broker: BrokerURL,
        store: StoreRef | str | Path | None,
        users: Users,
        secure_cookies: bool = False,
        session_hours: float = 12,
    ) -> None:
        self.settings = settings
        self.zone = ZoneInfo(settings.service.timezone)
        self.messages = Messages(settings)
        # the dispatcher's clock, as the latest live message stamped it: (its CloudEvent
        # time in epoch seconds, this process's monotonic clock when it came)
        self._heard: tuple[float, float] | None = None
        self.broker = broker
        # the dispatcher's store, read for history and presence: a SQLite file or PostgreSQL
        self.store = (
            None if store is None else store if isinstance(store, StoreRef) else StoreRef(store)
        )
        self.users = users
        self.secure_cookies = secure_cookies
        self.session_s = session_hours * 3600
        self.topics = Topics(settings.service.prefix)
        self.router = TopicRouter(settings)
        self.board = Board(settings)
        self.sessions: dict[str, Session] = {}
        self.viewers: set[Viewer] = set()
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        # the feed from the broker: connecting, live, reconnecting, or stopped (the board
        # is then stale, and says so)
        self.feed = "connecting"
        self.mqtt_task: asyncio.Task[None] | None = None
        self._closing = False
        # the dispatcher's own presence: online, offline, or unknown until it is heard from
        self.dispatcher = "unknown"
        self.serving: dict[str, str] = {}  # which instance serves, since when (PostgreSQL)
        self._epoch = 0  # the highest lease epoch said to serve (active/standby)
        # without the dispatcher's store: status events taken, by (source, id), to take each once
        self._status_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._presence_dirty = asyncio.Event()
        self._refusals: dict[str, tuple[float, int]] = {}  # topic -> (last logged, not logged)
        # failed logins: of an operator from one address (the guesser's own, up to 15 min),
        # from one address over every operator id (up to 15 min), and of an operator from
        # anywhere, whose wait stays short (30 s at most): guessers on many addresses are
        # slowed, and nobody can lock an operator out of the console from elsewhere
        # behind a reverse proxy every login comes from the proxy: the client's own address
        # is what the proxy forwards (decisions.md 122)
        self.proxies = [
            ipaddress.ip_network(proxy, strict=False) for proxy in settings.console.trusted_proxies
        ]
        self.pair_throttle = LoginThrottle(free=5)
        self.address_throttle = LoginThrottle(free=20)
        self.operator_throttle = LoginThrottle(free=10, cap_s=OPERATOR_WAIT_CAP_S)
        self._hasher = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="console-hash")
        self._hashing = 0
        self.app = self._app()

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._security_headers, self._same_origin],
            client_max_size=MAX_BODY_BYTES,
        )
        app.router.add_get("/", self.index)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/api/state", self.state)
        app.router.add_post("/api/incidents/{incident_id}/{action}", self.act)
        app.router.add_get("/api/incidents/{incident_id}", self.incident)
        app.router.add_get("/api/history", self.history)
        app.router.add_get("/api/history.csv", self.history_csv)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/favicon.ico", self.favicon)
        app.router.add_static("/static/", STATIC)
        app.cleanup_ctx.append(self._background)
        return app

    @web.middleware
    async def _security_headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
            "frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        # not "no-referrer": under it a browser sends "Origin: null" even for the console's
        # own requests, and the origin check below could not tell them from a foreign page's
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    @web.middleware
    async def _same_origin(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A browser says which page a request comes from; only the console's own may act
        or read the live feed. (Other clients send no ``Origin`` and need the cookie.)"""
        if request.method not in ("GET", "HEAD", "OPTIONS") or request.path == "/ws":
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower() not in self._own_origins(request):
                log.warning(
                    "console_foreign_origin", origin=printable(origin), path=printable(request.path)
                )
                raise web.HTTPForbidden(text="请求来自调度台以外的页面，已拒绝")
        response: web.StreamResponse = await handler(request)
        return response

    def _own_origins(self, request: web.Request) -> set[str]:
        host = request.host.lower()
        schemes = {request.scheme, "https"} if self.secure_cookies else {request.scheme}
        return {f"{scheme}://{host}" for scheme in schemes}

    # ---- sessions --------------------------------------------------------------------------

    def _valid(self, session: Session) -> bool:
        return session.expires >= time.time() and session.credential == self.users.fingerprint_of(
            session.operator
        )

    def session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(COOKIE, "")
        session = self.sessions.get(token)
        if session is None:
            return None
        if not self._valid(session):
            self._end_session(token)
            return None
        return session

    def require(self, request: web.Request) -> Session:
        session = self.session(request)
        if session is None:
            raise web.HTTPUnauthorized(text="请先登录")
        return session

    def _end_session(self, token: str) -> None:
        self.sessions.pop(token, None)
        for viewer in [v for v in self.viewers if v.token == token]:
            self._drop(viewer, "session_ended")

    def _sweep(self) -> None:
        """End every session whose password changed or that expired, and its live feeds."""
        for token, session in list(self.sessions.items()):
            if not self._valid(session):
                log.info("console_session_ended", operator=session.operator)
                self._end_session(token)

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "login.html")

    async def _form(self, request: web.Request) -> tuple[str, str]:
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(
                MAX_BODY_BYTES, request.content_length or 0, text="登录表单过大"
            ) from None
        except Exception as exc:  # anything a client may send as a form: a 400, said why
            log.warning("console_login_unreadable", error=printable(f"{type(exc).__name__}: {exc}"))
            raise web.HTTPBadRequest(text="登录表单无法读取") from None
        operator, password = form.get("operator", ""), form.get("password", "")
        if not isinstance(operator, str) or not isinstance(password, str):
            raise web.HTTPBadRequest(text="登录表单无法读取")
        return operator, password

    def _throttled(self, retry_s: float, text: str) -> web.Response:
        seconds = max(1, math.ceil(retry_s))
        body = (
            '<!doctype html><html lang="zh-CN"><meta charset="utf-8"><title>请稍后再试</title>'
            '<link rel="stylesheet" href="/static/console.css"><body class="login">'
            f'<div class="login-box"><h1>反诈预警调度台</h1><p class="refused">{text}，'
            f'请 {seconds} 秒后再试。</p><a href="/login">返回登录</a></div></body></html>'
        )
        return web.Response(
            status=429,
            text=body,
            content_type="text/html",
            headers={"Retry-After": str(seconds)},
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        operator, password = await self._form(request)
        address = client_address(
            request.remote, request.headers.getall("X-Forwarded-For", []), self.proxies
        )
        key = operator[:64]
        pair = f"{key}\0{address}"
        wait = max(
            self.pair_throttle.wait(pair),
            self.address_throttle.wait(address),
            self.operator_throttle.wait(key),
        )
        if wait > 0:
            log.warning(
                "console_login_throttled", operator=printable(key, 64), address=address, wait_s=wait
            )
            return self._throttled(wait, "登录失败次数过多")
        if self._hashing >= HASH_WAITING:
            return self._throttled(1, "登录请求过多")
        known = operator in self.settings.access.operators and bool(OPERATOR_ID.match(operator))
        self._hashing += 1
        try:
            credential = await asyncio.get_running_loop().run_in_executor(
                self._hasher,
                self.users.verify,
                operator if known else "\0unknown",
                password[:1024],
            )
        finally:
            self._hashing -= 1
        if credential is None or len(password) > 1024:
            self.pair_throttle.failed(pair)
            self.address_throttle.failed(address)
            self.operator_throttle.failed(key)
            log.warning("console_login_failed", operator=printable(key, 64), address=address)
            raise web.HTTPFound("/login?failed=1")
        self.pair_throttle.succeeded(pair)
        self.operator_throttle.succeeded(key)
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(
            operator, secrets.token_urlsafe(32), time.time() + self.session_s, credential
        )
        log.info("console_login", operator=operator)
        response = web.HTTPFound("/")
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="Strict",
            secure=self.secure_cookies,
            max_age=int(self.session_s),
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self.require(request)
        self._check_csrf(request, session)
        self._end_session(request.cookies.get(COOKIE, ""))
        response = web.HTTPFound("/login")
        response.del_cookie(COOKIE)
        raise response

    @staticmethod
    def _check_csrf(request: web.Request, session: Session) -> None:
        token = request.headers.get("X-CSRF-Token", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, session.csrf.encode("ascii")):
            raise web.HTTPForbidden(text="缺少或错误的 CSRF 令牌：请刷新页面后重试")

    # ---- pages and the board ---------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        if self.session(request) is None:
            raise web.HTTPFound("/login")
        return web.FileResponse(STATIC / "index.html")

    async def state(self, request: web.Request) -> web.StreamResponse:
        session = self.require(request)
        return web.json_response(
            {
                "operator": session.operator,
                "csrf": session.csrf,
                "connected": self.connected.is_set(),
                "feed": self.feed,
                "dispatcher": self.dispatcher,
                "dispatcher_serving": self.serving,
                "callback_max": self.settings.callback.max_attempts,
                "dispatcher_now": self.dispatcher_now(),
                **self.vocabulary(),
                **self.board.snapshot(),
            }
        )

    def vocabulary(self) -> dict[str, Any]:
        """What the page needs to say everything in Chinese, in the deployment's time zone."""
        return {
            "timezone": self.settings.service.timezone,
            "outcomes": dict(OUTCOME_TEXT),
            "alert_text": ALERT_TEXT,
            "rules": {r.id: self.settings.rule_name(r.id) for r in self.settings.rules},
            "stations": {k: v.name for k, v in self.settings.stations.items()},
            "unit_names": {u.id: u.name for u in self.settings.units.values()},
        }

    def dispatcher_now(self) -> str:
        """The dispatcher's clock now, as far as its messages tell (RFC 3339, UTC): a
        sped-up or skewed dispatcher clock is what every duration is measured on."""
        if self._heard is None:
            now = time.time()
        else:
            heard, at = self._heard
            now = heard + (time.monotonic() - at)
        text = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")

    def _hear(self, stamp: str | None, retained: bool) -> None:
        """A live message's CloudEvent time sets the dispatcher's clock (a retained one was
        stamped whenever it was published, so it says nothing about now)."""
        if retained or not stamp:
            return
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            if moment.tzinfo is not None:
                self._heard = (moment.timestamp(), time.monotonic())

    async def favicon(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml"})

    async def incident(self, request: web.Request) -> web.StreamResponse:
        """One incident, as the board has it or, once off the board, from the store."""
        self.require(request)
        incident_id = request.match_info["incident_id"]
        if not INCIDENT_ID_RE.match(incident_id):
            raise web.HTTPBadRequest(text="事件编号无效")
        found = self.board.incidents.get(incident_id)
        if found is None:
            try:
                found = await asyncio.to_thread(self._stored_incident, incident_id)
            except READ_ERRORS as exc:
                log.warning("console_history_unavailable", error=str(exc))
                raise web.HTTPServiceUnavailable(text="历史记录暂时无法读取，请稍后再试") from None
        if found is None:
            raise web.HTTPNotFound(text="没有这个事件")
        return web.json_response({"incident": found})

    def _stored_incident(self, incident_id: str) -> dict[str, Any] | None:
        if self.store is None or not self.store.exists():
            return None
        with contextlib.closing(self.store.connect()) as db:
            row = db.execute("SELECT doc FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            origin = self._origin(db)
            if row is None:
                return None
            timeline = stored_timeline(db, incident_id)
        incident = Incident.from_doc(json.loads(row[0]), timeline)
        return self.messages.incident_detail(incident, origin)

    @staticmethod
    def _origin(db: Any) -> float:
        """Epoch seconds at the store's clock 0 (a replay's clock starts at its recording)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'clock_origin'").fetchone()
        return float(row[0]) if row else 0.0

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        socket = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        await socket.prepare(request)
        viewer = Viewer(socket, request, request.cookies.get(COOKIE, ""))
        viewer.writer = asyncio.create_task(self._send_frames(viewer))
        self.viewers.add(viewer)
        try:
            async for message in socket:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.viewers.discard(viewer)
            viewer.writer.cancel()
        return socket

    async def _send_frames(self, viewer: Viewer) -> None:
        try:
            while True:
                text = await viewer.queue.get()
                async with asyncio.timeout(VIEWER_SEND_S):
                    await viewer.socket.send_str(text)
        except (ConnectionError, RuntimeError, TimeoutError):
            self._drop(viewer, "send_failed")

    def _drop(self, viewer: Viewer, why: str) -> None:
        """Cut one browser's feed at once (it reconnects and reloads the board if it may)."""
        self.viewers.discard(viewer)
        if viewer.writer is not None:
            viewer.writer.cancel()
        log.info("console_viewer_dropped", why=why)
        transport = viewer.request.transport
        if transport is not None:
            transport.abort()

    async def broadcast(self, kind: str, data: Any, stamp: str | None = None) -> None:
        """A frame to every browser; ``stamp`` is the CloudEvent time of a live message, from
        which the page learns the dispatcher's clock."""
        frame: dict[str, Any] = {"kind": kind, "data": data}
        if stamp:
            frame["time"] = stamp
        text = json.dumps(frame, ensure_ascii=False)
        for viewer in list(self.viewers):
            try:
                viewer.queue.put_nowait(text)
            except asyncio.QueueFull:
                self._drop(viewer, "too_slow")

    # ---- actions ---------------------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(
                MAX_BODY_BYTES, request.content_length or 0, text="请求内容过大"
            ) from None
        try:
            body = decode_payload(raw, MAX_BODY_BYTES, 8)
        except InputError as exc:
            raise web.HTTPBadRequest(text=f"请求内容不是有效的 JSON（{exc.reason}）") from None
        if type(body) is not dict:
            raise web.HTTPBadRequest(text="请求内容应为 JSON 对象")
        return body

    async def act(self, request: web.Request) -> web.StreamResponse:
        session = self.require(request)
        self._check_csrf(request, session)
        incident_id, action = request.match_info["incident_id"], request.match_info["action"]
        if action not in ACTIONS:
            raise web.HTTPNotFound(text=f"没有这种操作：{printable(action, 40)}")
        if not INCIDENT_ID_RE.match(incident_id):
            raise web.HTTPBadRequest(text="事件编号无效")
        body = await self._json_body(request)
        data: dict[str, Any] = {"incident_id": incident_id}
        for name, allowed in ACTIONS[action].items():
            value = body.get(name)
            if not isinstance(value, str) or value not in allowed:
                raise web.HTTPBadRequest(text=f"{name} 应为以下之一：{', '.join(allowed)}")
            data[name] = value
        if action == "acknowledge":
            alerts = body.get("alerts")
            if (
                not isinstance(alerts, list)
                or not alerts
                or not all(isinstance(a, str) and a in ALERT_TEXT for a in alerts)
            ):
                raise web.HTTPBadRequest(text="alerts 应为要确认的警报代码列表")
            data["alerts"] = sorted(set(alerts))
        if action == "close":
            note = body.get("note")
            if note is not None and not isinstance(note, str):
                raise web.HTTPBadRequest(text="备注应为文字")
            if note and len(note) > NOTE_CHARS:
                raise web.HTTPBadRequest(text=f"备注最多 {NOTE_CHARS} 字")
            if note:
                data["note"] = note
        client = self.client
        if client is None:
            raise web.HTTPServiceUnavailable(text="没有连接到消息服务器，操作未发送")
        event_id = f"{session.operator}-{uuid.uuid4().hex}"
        event = cloudevent(
            event_id,
            f"console/{session.operator}",
            f"cn.antifraud.operator.{action}",
            data,
            subject=incident_id,
        )
        sent = self.board.pending.setdefault(session.operator, OrderedDict())
        sent[event_id] = None
        while len(sent) > PENDING_ACTIONS:
            sent.popitem(last=False)
        payload = json.dumps(event, ensure_ascii=False).encode()
        logged = log.bind(
            operator=session.operator, incident_id=incident_id, action=action, event_id=event_id
        )
        try:
            async with asyncio.timeout(ACTION_CONFIRM_S):
                await publish_acknowledged(
                    client, [(self.topics.actions(session.operator), payload, 1, False)]
                )
        except (BrokerError, TimeoutError) as exc:
            # it may or may not have reached the broker: the operator must look, then decide
            logged.warning(
                "console_action_unconfirmed",
                error=str(exc) or f"no acknowledgement within {ACTION_CONFIRM_S:g} s",
            )
            raise web.HTTPServiceUnavailable(text=UNCONFIRMED) from None
        logged.info("console_action")
        return web.json_response({"action_id": event_id})

    # ---- history ---------------------------------------------------------------------------

    @staticmethod
    def _query(request: web.Request) -> dict[str, str]:
        """The history filters, checked: a 400 saying which is wrong."""
        query = {k: request.query.get(k, "").strip() for k in ("q", "outcome", "from", "to")}
        for text in query.values():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise web.HTTPBadRequest(text="查询条件含有无效字符") from None
        if len(query["q"]) > 100:
            raise web.HTTPBadRequest(text="查询文字最多 100 字")
        if query["outcome"] and query["outcome"] not in OUTCOMES:
            raise web.HTTPBadRequest(text="结果筛选无效")
        for name in ("from", "to"):
            day = query[name]
            if day:
                try:
                    if not ISO_DAY.match(day):
                        raise ValueError(day)
                    date.fromisoformat(day)
                except ValueError:
                    raise web.HTTPBadRequest(
                        text="日期应写成 YYYY-MM-DD，例如 2021-10-15"
                    ) from None
        return query

    def _search(self, query: dict[str, str]) -> list[dict[str, Any]]:
        if self.store is None or not self.store.exists():
            return []
        with contextlib.closing(self.store.connect()) as db:
            rows = db.execute(
                "SELECT doc FROM incidents WHERE status = 'closed' "
                "ORDER BY closed_at DESC LIMIT 5000"
            ).fetchall()
            origin = self._origin(db)
        found = []
        text = query.get("q", "")
        outcome = query.get("outcome", "")
        since, until = query.get("from", ""), query.get("to", "")
        for (doc,) in rows:
            inc = json.loads(doc)
            sub = self.settings.subscribers.get(inc["subscriber"])
            # the deployment's zone, whatever the server's: the same day boundaries and
            # clock times as the board, for every operator
            closed = datetime.fromtimestamp(origin + inc["closed_at"], tz=self.zone)
            day = closed.date().isoformat()
            resident = " ".join(
                filter(
                    None,
                    [
                        inc["subscriber"],
                        sub.name if sub else "",
                        sub.display_name if sub else "",
                        sub.address if sub else "",
                    ],
                )
            )
            if text and text not in resident and text not in inc["counterpart"]:
                continue
            if outcome and inc["outcome"] != outcome:
                continue
            if (since and day < since) or (until and day > until):
                continue
            found.append(
                {
                    "incident_id": inc["id"],
                    "closed": closed.isoformat(sep=" ", timespec="seconds"),
                    "subscriber": inc["subscriber"],
                    "name": sub.name if sub else "",
                    "counterpart": inc["counterpart"],
                    "severity": inc["severity"],
                    "rule": inc["rule"],
                    "outcome": inc["outcome"],
                    "note": inc.get("note") or "",
                }
            )
        return found

    async def _found(self, request: web.Request) -> list[dict[str, Any]]:
        self.require(request)
        query = self._query(request)
        try:
            return await asyncio.to_thread(self._search, query)
        except READ_ERRORS as exc:
            log.warning("console_history_unavailable", error=str(exc))
            raise web.HTTPServiceUnavailable(text="历史记录暂时无法读取，请稍后再试") from None

    async def history(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"incidents": await self._found(request)})

    async def history_csv(self, request: web.Request) -> web.StreamResponse:
        rows = await self._found(request)
        out = io.StringIO()
        fields = [
            "incident_id",
            "closed",
            "subscriber",
            "name",
            "counterpart",
            "severity",
            "rule",
            "outcome",
            "note",
        ]
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        # a cell a spreadsheet would take for a formula (a note "=HYPERLINK(…)") is text
        writer.writerows({k: neutralise_cell(str(v)) for k, v in row.items()} for row in rows)
        return web.Response(
            body=("\ufeff" + out.getvalue()).encode("utf-8"),  # Excel: BOM
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="incidents.csv"'},
        )

    # ---- statistics -----------------------------------------------------------------------

    @staticmethod
    def _period(request: web.Request) -> tuple[date | None, date | None]:
        """The days ``from`` and ``to`` (both optional, both included), checked: a 400."""
        days: list[date | None] = []
        for name in ("from", "to"):
            text = request.query.get(name, "").strip()
            if not text:
                days.append(None)
                continue
            try:
                if not ISO_DAY.match(text):
                    raise ValueError(text)
                days.append(date.fromisoformat(text))
            except ValueError:
                raise web.HTTPBadRequest(text="日期应写成 YYYY-MM-DD，例如 2021-10-15") from None
        first, last = days
        if first is not None and last is not None and first > last:
            raise web.HTTPBadRequest(text="开始日期不能晚于结束日期")
        return first, last

    def _stats(self, first: date | None, last: date | None) -> dict[str, Any]:
        """The figures of ``antifraud stats`` for the period, their charts, the incidents
        behind each figure and a line on each of those incidents."""
        zone = self.settings.service.timezone
        if self._reads_store():
            assert self.store is not None
            incidents, dispatches, origin = read_store(self.store)
        else:
            incidents, dispatches, origin = [], [], 0.0
        stats = figures(incidents, dispatches, origin, zone, first, last)
        keys = behind(incidents, dispatches, origin, zone, first, last)
        shown = set(keys.get("all", []))
        lines = {
            inc["id"]: {
                "opened": datetime.fromtimestamp(origin + inc["opened_at"], self.zone).isoformat(
                    sep=" ", timespec="seconds"
                ),
                "rule": inc["rule"],
                "outcome": inc["outcome"] or "open",
            }
            for inc in incidents
            if inc["id"] in shown
        }
        return {"figures": stats, "charts": charts(stats), "behind": keys, "incidents": lines}

    async def stats(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        first, last = self._period(request)
        try:
            found = await asyncio.to_thread(self._stats, first, last)
        except STORE_READ_ERRORS as exc:
            log.warning("console_stats_unavailable", error=str(exc))
            raise web.HTTPServiceUnavailable(text="统计数据暂时无法读取，请稍后再试") from None
        return web.json_response(found)

    # ---- background: the feed, presence, sessions ------------------------------------------

    async def _background(self, app: web.Application) -> Any:
        self.mqtt_task = asyncio.create_task(self._mqtt())
        self.mqtt_task.add_done_callback(self._feed_ended)
        others = [asyncio.create_task(self._presence_loop()), asyncio.create_task(self._sweeper())]
        yield
        self._closing = True
        for task in [self.mqtt_task, *others]:
            task.cancel()
        for task in [self.mqtt_task, *others]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for viewer in list(self.viewers):
            self._drop(viewer, "shutdown")
        self._hasher.shutdown(wait=False, cancel_futures=True)

    def _feed_ended(self, task: asyncio.Task[None]) -> None:
        """The feed is meant to run as long as the console: if it ends anyway, the board is
        stale and every browser is told so; actions are refused at once."""
        if self._closing:
            return
        error = None if task.cancelled() else task.exception()
        log.error("console_feed_stopped", error=repr(error) if error else "cancelled")
        self.client = None
        self.connected.clear()
        self.feed = "stopped"
        asyncio.get_running_loop().create_task(self._announce_feed())

    async def _announce_feed(self) -> None:
        await self.broadcast("connection", {"connected": self.feed == "live", "feed": self.feed})

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                self._sweep()
            except Exception:  # a defect here must not end sessions' checks for good
                log.exception("console_sweep_failed")

    async def _mqtt(self) -> None:
        backoff = Backoff(cap=10.0)
        while True:
            try:
                async with open_client(
                    self.broker, self.broker.username or f"console-{uuid.uuid4().hex[:8]}"
                ) as client:
                    await client.subscribe([(t, 1) for t in self._filters()])
                    self.client = client
                    log.info("console_broker_connected", broker=node_of(client))
                    self.connected.set()
                    self.feed = "live"
                    backoff.reset()
                    self._presence_dirty.set()
                    await self._announce_feed()
                    async for message in client.messages:
                        await self.handle_message(
                            str(message.topic), message.payload, bool(message.retain)
                        )
            except BrokerError as exc:
                log.warning("console_broker_unavailable", error=str(exc))
            except Exception:  # a defect: the feed reconnects rather than ends
                log.exception("console_feed_failed")
            self.client = None
            self.connected.clear()
            self.feed = "reconnecting"
            await self._announce_feed()
            await asyncio.sleep(backoff.next_delay())

    async def handle_message(self, topic: str, payload: Any, retained: bool = False) -> None:
        """One message off the broker. Never raises: what it refuses is logged with why."""
        try:
            raw = payload if isinstance(payload, bytes) else bytes(payload or b"")
            await self._on_message(topic, raw, retained)
        except Refused as refused:
            self._log_refusal(topic, refused.reason)
        except Exception:
            log.exception("console_message_failed", topic=printable(topic, 200))

    def _log_refusal(self, topic: str, reason: str) -> None:
        """One line per topic and second at most: a flood of junk does not flood the log."""
        now = time.monotonic()
        last, quiet = self._refusals.get(topic, (0.0, 0))
        if now - last < 1.0:
            self._refusals[topic] = (last, quiet + 1)
            return
        if len(self._refusals) >= 4096:
            self._refusals.clear()
        self._refusals[topic] = (now, 0)
        log.warning(
            "console_message_refused",
            topic=printable(topic, 200),
            reason=printable(reason, 300),
            not_logged_before=quiet,
        )

    def _event(self, topic: str, raw: bytes, types: tuple[str, ...]) -> Any:
        """The message as the published protocol has it (its validated model), or Refused."""
        try:
            event = decode_payload(raw, MAX_FEED_BYTES, MAX_FEED_DEPTH)
        except InputError as exc:
            raise Refused(exc.reason) from None
        kind = event.get("type") if type(event) is dict else None
        if not isinstance(kind, str) or kind not in types:
            raise Refused(f"not one of {', '.join(types)} (type {printable(repr(kind), 80)})")
        try:
            return OUTBOUND_EVENTS[kind].model_validate(event, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise Refused(f"not a valid {kind}: {where}: {first['msg']}") from None

    async def _on_message(self, topic: str, raw: bytes, retained_copy: bool = False) -> None:
        prefix = self.topics.prefix
        parts = topic.split("/")
        tail = parts[len(prefix.split("/")) :] if topic.startswith(prefix + "/") else []
        if topic == self.topics.dispatcher_status:
            model = self._event(topic, raw, ("cn.antifraud.dispatcher.status",))
            self._hear(model.time, retained_copy)
            data = model.data
            if data.state == "offline" and data.epoch is not None and data.epoch < self._epoch:
                return  # the will of an instance that served before the one serving now
            if data.epoch is not None:
                self._epoch = max(self._epoch, data.epoch)
            self.dispatcher = data.state
            self.serving = (
                {"instance": data.instance, "since": data.since or ""} if data.instance else {}
            )
            await self.broadcast("dispatcher", {"state": self.dispatcher, **self.serving})
        elif len(tail) == 3 and tail[0] == "units" and tail[2] == "status":
            await self._on_status(topic, raw)
        elif topic == self.topics.deadletter:
            model = self._event(topic, raw, ("cn.antifraud.input.rejected",))
            self._hear(model.time, retained_copy)
            # the refusal of an action this console sent: its id, and its operator's topic
            # and source (another party's message of the same id is not this action)
            refused = model.data
            source = refused.source or ""
            operator = source.removeprefix("console/")
            sent = self.board.pending.get(operator) if source.startswith("console/") else None
            if (
                sent is not None
                and (refused.id or "") in sent
                and refused.topic == self.topics.actions(operator)
            ):
                del sent[refused.id or ""]
                await self.broadcast(
                    "refused",
                    {
                        "action_id": model.data.id,
                        "operator": operator,
                        "reason": model.data.reason,
                        "text": refusal_text(model.data.reason),
                    },
                )
        elif topic == self.topics.operators or (len(tail) == 2 and tail[0] == "incidents"):
            retained = topic != self.topics.operators
            if not raw and retained:
                return  # a retained incident cleared after its retention
            model = self._event(
                topic,
                raw,
                (
                    "cn.antifraud.incident.opened",
                    "cn.antifraud.incident.updated",
                    "cn.antifraud.incident.closed",
                ),
            )
            incident = model.data.model_dump(mode="json")
            if retained and tail[1] != incident["incident_id"]:
                raise Refused(f"incident {incident['incident_id']} on another incident's topic")
            await self._whole_timeline(incident)
            self.board.put(incident)
            self._hear(model.time, retained_copy)
            await self.broadcast("incident", incident, model.time if not retained_copy else None)
            await self.broadcast("units", self.board.units())
        else:
            raise Refused("not a topic the console reads")

    async def _whole_timeline(self, incident: dict[str, Any]) -> None:
        """An update carries only the entries it added (from ``timeline_from`` on): put them
        after what the board already has. When the board lacks some (the console started
        after them, or its session lost them), the store has the whole timeline; without
        the store the board keeps what it has, and its ``timeline_from`` says how many
        entries before them the page cannot show."""
        start = incident["timeline_from"]
        if start == 0:
            return
        known = self.board.incidents.get(incident["incident_id"])
        if known is not None:
            held_from, held = known["timeline_from"], known["timeline"]
            if held_from <= start <= held_from + len(held):
                incident["timeline"] = held[: start - held_from] + incident["timeline"]
                incident["timeline_from"] = held_from
                if held_from == 0:
                    return
        if self._reads_store():
            try:
                stored = await asyncio.to_thread(self._stored_items, incident["incident_id"])
            except READ_ERRORS as exc:
                log.warning("console_history_unavailable", error=str(exc))
            else:
                first = incident["timeline_from"]  # of what is held now
                if len(stored) >= first:
                    incident["timeline"] = stored[:first] + incident["timeline"]
                    incident["timeline_from"] = 0

    def _stored_items(self, incident_id: str) -> list[dict[str, Any]]:
        """An incident's whole timeline as the store holds it, as incident messages carry it."""
        assert self.store is not None
        with contextlib.closing(self.store.connect()) as db:
            return self.messages.timeline_items(stored_timeline(db, incident_id), self._origin(db))

    # ---- presence --------------------------------------------------------------------------

    def _reads_store(self) -> bool:
        return self.store is not None and self.store.exists()

    def _filters(self) -> list[str]:
        """What the console subscribes to. With the dispatcher's store it reads presence
        there and not from the units' status topics: its one broker session then holds no
        message a unit sent, so a radio flooding its own status cannot fill the queue the
        incidents reach the board through (RELIABILITY.md, "Console")."""
        filters = self.topics.console_filters()
        if self._reads_store():
            filters = [f for f in filters if f != self.topics.all_unit_status]
        return filters

    async def _on_status(self, topic: str, raw: bytes) -> None:
        """A unit's presence counts only as the dispatcher takes it: the same validation (a
        known unit, on its own topic, a valid status event). With the dispatcher's store at
        hand the board shows what the dispatcher stored (duplicates and refusals included);
        the message only says it is time to look."""
        try:
            msg = parse_message(self.router, topic, raw, self.settings)
        except InputError as exc:
            raise Refused(exc.reason) from None
        if self._reads_store():
            self._presence_dirty.set()
            return
        key = (msg.source, msg.id)
        if key in self._status_seen:
            raise Refused(f"repeat of status event ({msg.source!r}, {msg.id!r})")
        self._status_seen[key] = None
        while len(self._status_seen) > 100_000:
            self._status_seen.popitem(last=False)
        if self.board.presence.get(msg.party) != msg.data.state:
            self.board.presence[msg.party] = msg.data.state
            await self.broadcast("units", self.board.units())

    def _stored_presence(self) -> dict[str, str]:
        assert self.store is not None
        with contextlib.closing(self.store.connect()) as db:
            rows = db.execute("SELECT unit, state FROM presence").fetchall()
        return {
            str(unit): str(state)
            for unit, state in rows
            if unit in self.settings.units and state in ("online", "offline")
        }

    async def _presence_loop(self) -> None:
        """Presence from the dispatcher's store: at once after a status message (and for two
        seconds after, while the dispatcher commits it), else every few seconds."""
        loop = asyncio.get_running_loop()
        busy_until = 0.0
        while True:
            wait = 0.1 if loop.time() < busy_until else PRESENCE_POLL_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence_dirty.wait(), wait)
            if self._presence_dirty.is_set():
                self._presence_dirty.clear()
                busy_until = loop.time() + 2.0
            if not self._reads_store():
                continue
            try:
                stored = await asyncio.to_thread(self._stored_presence)
            except READ_ERRORS as exc:
                self._log_refusal("store presence", f"the store cannot be read: {exc}")
                continue
            if stored != self.board.presence:
                self.board.presence = stored
                await self.broadcast("units", self.board.units())
