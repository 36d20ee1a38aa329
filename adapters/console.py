"""The operator console: a web page for the anti-fraud center, live over MQTT.

The console is an operator client like any other (docs/protocol.md): it reads incidents from
``operators/incidents`` and the retained ``incidents/+``, unit presence from the retained
``units/+/status``, refusals from the dead-letter topic, and publishes each operator's actions
on ``operators/{operator}/actions`` with CloudEvent source ``console/{operator}``. Browsers get
the board over a WebSocket; history comes from the dispatcher's store, read-only.

Operators log in with a password (scrypt-hashed in ``console.users_file``); sessions are
random tokens in an HttpOnly, SameSite=Strict cookie, and every action must carry the
session's CSRF token. Every asset is served from here: no internet is needed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import hmac
import io
import json
import secrets
import sqlite3
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from aiohttp import WSMsgType, web

from adapters.mqtt import Backoff, BrokerURL, open_client, publish_acknowledged
from dispatcher.errors import BrokerError
from dispatcher.inbound import cloudevent
from dispatcher.outbound import Topics
from dispatcher.settings import Settings

log = structlog.get_logger("console")

STATIC = Path(__file__).resolve().parent / "console_static"
COOKIE = "antifraud_session"
ACTION_CONFIRM_S = 5.0  # how long an action may wait for the broker to confirm it
UNCONFIRMED = "与消息服务器的连接中断，无法确认操作已送达：请看事件状态是否已变，再决定是否重做"
ACTIONS = {
    "callback": {"result": ("no_answer", "busy", "answered_safe", "answered_at_risk")},
    "escalate": {},
    "close": {"outcome": ("prevented", "loss", "false_alarm", "unreachable")},
}


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
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


class Users:
    """Operator id -> password hash, in a JSON file (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.items()}

    def set_password(self, operator: str, password: str) -> None:
        users = self.load()
        users[operator] = hash_password(password)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(users, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.path)

    def check(self, operator: str, password: str) -> bool:
        stored = self.load().get(operator)
        if stored is None:
            check_password(password, hash_password("timing"))  # same work either way
            return False
        return check_password(password, stored)


@dataclass
class Session:
    operator: str
    csrf: str
    expires: float


# ---- the board ------------------------------------------------------------------------------


class Board:
    """What the consoles show, kept from the MQTT feed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.incidents: dict[str, dict[str, Any]] = {}
        self.presence: dict[str, str] = {}
        self.pending: OrderedDict[str, str] = OrderedDict()  # action event id -> operator

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
        store: Path | None,
        users: Users,
        secure_cookies: bool = False,
        session_hours: float = 12,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.store = store
        self.users = users
        self.secure_cookies = secure_cookies
        self.session_s = session_hours * 3600
        self.topics = Topics(settings.service.prefix)
        self.board = Board(settings)
        self.sessions: dict[str, Session] = {}
        self.sockets: set[web.WebSocketResponse] = set()
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        # the dispatcher's own presence: online, offline, or unknown until it is heard from
        self.dispatcher = "unknown"
        self.app = self._app()

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._security_headers])
        app.router.add_get("/", self.index)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/api/state", self.state)
        app.router.add_post("/api/incidents/{incident_id}/{action}", self.act)
        app.router.add_get("/api/history", self.history)
        app.router.add_get("/api/history.csv", self.history_csv)
        app.router.add_get("/ws", self.websocket)
        app.router.add_static("/static/", STATIC)
        app.cleanup_ctx.append(self._mqtt_context)
        return app

    @web.middleware
    async def _security_headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
            "frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    # ---- sessions --------------------------------------------------------------------------

    def session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(COOKIE)
        session = self.sessions.get(token or "")
        if session is None or session.expires < time.time():
            return None
        return session

    def require(self, request: web.Request) -> Session:
        session = self.session(request)
        if session is None:
            raise web.HTTPUnauthorized(text="请先登录")
        return session

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "login.html")

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        operator, password = str(form.get("operator", "")), str(form.get("password", ""))
        if operator not in self.settings.access.operators or not self.users.check(
            operator, password
        ):
            log.warning("console_login_failed", operator=operator[:64])
            raise web.HTTPFound("/login?failed=1")
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(
            operator, secrets.token_urlsafe(32), time.time() + self.session_s
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
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = web.HTTPFound("/login")
        response.del_cookie(COOKIE)
        raise response

    @staticmethod
    def _check_csrf(request: web.Request, session: Session) -> None:
        token = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(token, session.csrf):
            raise web.HTTPForbidden(text="CSRF token missing or wrong")

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
                "dispatcher": self.dispatcher,
                "callback_max": self.settings.callback.max_attempts,
                **self.board.snapshot(),
            }
        )

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        socket = web.WebSocketResponse(heartbeat=20)
        await socket.prepare(request)
        self.sockets.add(socket)
        try:
            async for message in socket:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.sockets.discard(socket)
        return socket

    async def broadcast(self, kind: str, data: Any) -> None:
        text = json.dumps({"kind": kind, "data": data}, ensure_ascii=False)
        for socket in list(self.sockets):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await socket.send_str(text)

    # ---- actions ---------------------------------------------------------------------------

    async def act(self, request: web.Request) -> web.StreamResponse:
        session = self.require(request)
        self._check_csrf(request, session)
        incident_id, action = request.match_info["incident_id"], request.match_info["action"]
        if action not in ACTIONS:
            raise web.HTTPNotFound(text=f"no action {action!r}")
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body must be JSON") from None
        data: dict[str, Any] = {"incident_id": incident_id}
        for field, allowed in ACTIONS[action].items():
            if body.get(field) not in allowed:
                raise web.HTTPBadRequest(text=f"{field} must be one of {', '.join(allowed)}")
            data[field] = body[field]
        if action == "close" and body.get("note"):
            data["note"] = str(body["note"])[:2000]
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
        self.board.pending[event_id] = session.operator
        while len(self.board.pending) > 1000:
            self.board.pending.popitem(last=False)
        payload = json.dumps(event, ensure_ascii=False).encode()
        logged = log.bind(
            operator=session.operator, incident_id=incident_id, action=action, event_id=event_id
        )
        try:
            async with asyncio.timeout(ACTION_CONFIRM_S):
                await publish_acknowledged(
                    client, [(self.topics.actions(session.operator), payload, 1, False)]
                )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            # it may or may not have reached the broker: the operator must look, then decide
            logged.warning(
                "console_action_unconfirmed",
                error=str(exc) or f"no acknowledgement within {ACTION_CONFIRM_S:g} s",
            )
            raise web.HTTPServiceUnavailable(text=UNCONFIRMED) from None
        logged.info("console_action")
        return web.json_response({"action_id": event_id})

    # ---- history ---------------------------------------------------------------------------

    def _search(self, query: dict[str, str]) -> list[dict[str, Any]]:
        if self.store is None or not self.store.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT doc FROM incidents WHERE status = 'closed' "
                "ORDER BY closed_at DESC LIMIT 5000"
            ).fetchall()
        found = []
        text = query.get("q", "").strip()
        outcome = query.get("outcome", "").strip()
        since, until = query.get("from", "").strip(), query.get("to", "").strip()
        for (doc,) in rows:
            inc = json.loads(doc)
            sub = self.settings.subscribers.get(inc["subscriber"])
            closed = datetime.fromtimestamp(inc["closed_at"], tz=UTC).astimezone()
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
                    "closed": closed.isoformat(timespec="seconds"),
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

    async def history(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        rows = await asyncio.to_thread(self._search, dict(request.query))
        return web.json_response({"incidents": rows})

    async def history_csv(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        rows = await asyncio.to_thread(self._search, dict(request.query))
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
        writer.writerows(rows)
        return web.Response(
            body=("\ufeff" + out.getvalue()).encode("utf-8"),  # Excel: BOM
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="incidents.csv"'},
        )

    # ---- MQTT ------------------------------------------------------------------------------

    async def _mqtt_context(self, app: web.Application) -> Any:
        task = asyncio.create_task(self._mqtt())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _mqtt(self) -> None:
        backoff = Backoff(cap=10.0)
        while True:
            try:
                async with open_client(self.broker, f"console-{uuid.uuid4().hex[:8]}") as client:
                    await client.subscribe([(t, 1) for t in self.topics.console_filters()])
                    self.client = client
                    self.connected.set()
                    backoff.reset()
                    await self.broadcast("connection", {"connected": True})
                    async for message in client.messages:
                        await self._on_message(str(message.topic), message.payload)
            except (BrokerError, aiomqtt.MqttError) as exc:
                log.warning("console_broker_unavailable", error=str(exc))
            self.client = None
            self.connected.clear()
            await self.broadcast("connection", {"connected": False})
            await asyncio.sleep(backoff.next_delay())

    async def _on_message(self, topic: str, payload: Any) -> None:
        try:
            event = json.loads(bytes(payload)) if payload else None
        except (TypeError, ValueError):
            return
        if not isinstance(event, dict):
            return
        data = event.get("data")
        if topic == self.topics.dispatcher_status and isinstance(data, dict):
            self.dispatcher = "online" if data.get("state") == "online" else "offline"
            await self.broadcast("dispatcher", {"state": self.dispatcher})
        elif topic.endswith("/status") and isinstance(data, dict):
            unit = topic.split("/")[-2]
            self.board.presence[unit] = str(data.get("state"))
            await self.broadcast("units", self.board.units())
        elif topic.endswith("/deadletter") and isinstance(data, dict):
            operator = self.board.pending.pop(str(data.get("id")), None)
            if operator is not None:
                await self.broadcast(
                    "refused",
                    {
                        "action_id": data.get("id"),
                        "operator": operator,
                        "reason": data.get("reason"),
                    },
                )
        elif isinstance(data, dict) and "incident_id" in data and "timeline" in data:
            self.board.incidents[data["incident_id"]] = data
            await self.broadcast("incident", data)
            await self.broadcast("units", self.board.units())
