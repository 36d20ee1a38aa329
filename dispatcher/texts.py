"""Every sentence a person reads: timeline entries, receipts on a handset, stand-downs.

The workflow decides what happened and names it (an entry's ``kind``, a refusal's ``code``);
the words for it are here, in one place, for one reviewer to read through and keep in one
voice. Timeline texts go to operators' consoles and the incident's record; texts for units go
to radio screens and so stay short, and never carry a resident's full name.
"""

from __future__ import annotations

# ---- names ---------------------------------------------------------------------------------

# how the timeline names a unit's report and an incident's outcome, the code kept beside it
OUTCOME_TEXT = {
    "dissuaded": "已劝阻",
    "not_home": "无人在家",
    "loss": "已被骗",
    "false_alarm": "误报",
    "prevented": "已阻止",
    "unreachable": "未能联系到居民",
    "resolved_by_callback": "回拨确认安全",
}
SEVERITY_TEXT = {"warning": "预警", "critical": "紧急"}
# how the timeline names a dead end (the operators' consoles say what to do about it)
ALERT_NAME = {
    "unknown_subscriber": "未登记用户",
    "no_address": "地址不明",
    "door_exhausted": "无人可上门",
    "police_exhausted": "无民警接警",
    "arrival_overdue": "接警未到",
    "report_without_arrival": "未到先报",
    "arrival_too_soon": "到达过快",
    "report_overdue": "到达未报",
}
CALLBACK_RESULT_TEXT = {
    "no_answer": "无人接听",
    "busy": "占线",
    "answered_safe": "接通，确认安全",
    "answered_at_risk": "接通，仍有风险",
}


def outcome_text(code: str) -> str:
    return f"{OUTCOME_TEXT.get(code, code)}（{code}）"


def unit_label(name: str, unit_id: str) -> str:
    return f"{name}（{unit_id}）"


# ---- the timeline: calls and rules ---------------------------------------------------------


def opened(known: bool) -> str:
    """The first entry; the rules that opened the incident follow it, each with its
    severity (``rule_fired``), so it does not name one of them again."""
    return "事件开启" + ("" if known else "：用户不在登记名单，地址不详")


def call_joined(counterpart: str) -> str:
    return f"同一用户的另一通电话加入事件（对方{counterpart}）"


def call_ended(duration_s: float) -> str:
    return f"通话结束，时长{duration_s:g}秒"


def rule_fired(rule_name: str, severity: str) -> str:
    return f"规则「{rule_name}」（{SEVERITY_TEXT[severity]}）触发"


def callback_requested(max_attempts: int, window_s: float) -> str:
    return f"升为紧急：请接线员立即回拨（{max_attempts}次/{window_s:g}秒内无人接听即上门）"


def timeline_full(entries: int) -> str:
    return f"时间线已达{entries}条：此后不改变事件的通话与操作不再逐条记录"


# ---- the timeline: operators ---------------------------------------------------------------


def operator_close(outcome: str, note: str | None) -> str:
    return f"接线员结案：{outcome_text(outcome)}" + (f"，备注：{note}" if note else "")


ACKNOWLEDGE_IGNORED = "警报已有人确认，本次操作无变化"


def acknowledged(alerts: list[str]) -> str:
    return "接线员确认警报，转人工处置：" + "、".join(ALERT_NAME.get(a, a) for a in alerts)


def callback_result(result: str) -> str:
    return f"回拨结果：{CALLBACK_RESULT_TEXT[result]}"


def callback_not_counted(result: str, escalated: bool) -> str:
    why = "已升级" if escalated else "尚未紧急"
    return f"回拨结果：{CALLBACK_RESULT_TEXT[result]}（{why}，不计入）"


def callback_counted(result: str, attempt: int, limit: int) -> str:
    return f"回拨结果：{CALLBACK_RESULT_TEXT[result]}（第{attempt}/{limit}次）"


def escalate_police(station: str) -> str:
    return f"接线员要求出警：派{station}民警"


ESCALATE_IGNORED = "事件已升级，本次操作无变化"

# ---- the timeline: escalation, dispatch, close --------------------------------------------


def callback_window_passed(window_s: float) -> str:
    return f"回拨窗口{window_s:g}秒内无人接听"


def callbacks_failed(attempts: int) -> str:
    return f"{attempts}次回拨均未接通"


CALLBACK_AT_RISK = "回拨接通，居民仍有被骗风险"
OPERATOR_ESCALATED = "接线员手动升级"


def escalated(reason: str) -> str:
    return f"升级上门处置：{reason}"


def unknown_subscriber(default_station: str) -> str:
    return f"用户未登记，无法上门；如需出警请升级，由{default_station}派警"


def no_address(station: str) -> str:
    return f"用户地址不详，无法上门；请接线员升级以派{station}民警，或电话处置"


def exhausted(slot: str) -> str:
    what = "上门（保安/网格员/快警）" if slot == "door" else "出警（民警/快警）"
    return f"{what}无人可派或无人接警，请接线员人工调度"


def _need(slot: str) -> str:
    return "上门" if slot == "door" else "出警"


def waiting_on_other(slot: str) -> str:
    other = "出警" if slot == "door" else "上门"
    return f"{_need(slot)}：本所快警已在{other}派单中，等待其接警"


def served_by_other(slot: str, unit: str) -> str:
    return f"{_need(slot)}由已接警的{unit}一并承担，不再另行派员"


def arrival_overdue(unit: str, minutes: float) -> str:
    return f"{unit}接警后{minutes:g}分钟仍未到达，请接线员联系核实，必要时另行派员"


def report_without_arrival(unit: str, outcome: str) -> str:
    return (
        f"{unit}未报到达即反馈「{outcome_text(outcome)}」，"
        "请接线员电话核实是否已上门，必要时另行派员"
    )


def arrival_too_soon(unit: str, seconds: float, least: float) -> str:
    return (
        f"{unit}接警后{seconds:.0f}秒即报到达（到场至少需{least:g}秒），"
        "请接线员电话核实是否已上门，必要时另行派员"
    )


def report_overdue(unit: str, minutes: float) -> str:
    return f"{unit}到达后{minutes:g}分钟仍未反馈处置结果，请接线员联系核实"


def notified(unit: str) -> str:
    return f"已通知{unit}"


def offered(unit: str, accept_s: float) -> str:
    return f"派单给{unit}（{accept_s:g}秒内接警）"


def skipped(unit: str, offline: bool) -> str:
    return f"跳过{unit}（{'离线' if offline else '正在处置其他事件'}）"


def offer_expired(unit: str) -> str:
    return f"{unit}未在时限内接警"


def accepted(unit: str) -> str:
    return f"{unit}已接警"


def taken_from(unit: str, by: str) -> str:
    return f"{unit}的派单撤回（已由{by}接警）"


def declined(unit: str) -> str:
    return f"{unit}拒绝接警"


def arrived(unit: str) -> str:
    return f"{unit}已到达"


def reported(unit: str, outcome: str) -> str:
    return f"{unit}反馈处置结果：{outcome_text(outcome)}"


def stood_down(unit: str) -> str:
    return f"通知{unit}收队"


def closed(outcome: str) -> str:
    return f"事件结案：{outcome_text(outcome)}"


# ---- receipts: the answer to a unit's button press ----------------------------------------

# a receipt's text when its reply was applied, by reply (a report adds its outcome)
APPLIED_TEXT = {
    "accepted": "接警成功：此任务由您负责，请立即上门",
    "declined": "已拒绝：任务将转派他人",
    "arrived": "已记录到达：请立即敲门劝阻",
    "reported": "已反馈处置结果：{outcome}，任务完成",
}
REFUSED_PREFIX = "操作被拒绝："
# the receipt of a reply that could not be read as one, or whose handling failed
INVALID_REPLY = ("invalid", "回复格式有误，未被受理")
INTERNAL_ERROR = ("internal_error", "系统暂时无法受理，请电话联系值班员")
NOT_YOUR_DISPATCH = "此任务不是派给本机的"
INCIDENT_CLOSED = "事件已结案，无需前往"
UNKNOWN_DISPATCH = "没有这个任务，请核对"
NO_REPLY_EXPECTED = "此为知悉通知，无需回复"
TAKEN = "该任务已由他人接警"
EXPIRED = "接警已超时，任务已转派"
# a reply refused for being out of order, by (the dispatch's status, the reply)
OUT_OF_ORDER_TEXT = {
    ("offered", "arrived"): "请先确认接警再报到达",
    ("offered", "reported"): "请先确认接警再反馈结果",
    ("accepted", "accepted"): "已接警，无需重复确认",
    ("accepted", "declined"): "已接警，不能再拒绝",
    ("arrived", "accepted"): "已接警，无需重复确认",
    ("arrived", "declined"): "已接警，不能再拒绝",
    ("arrived", "arrived"): "已报到达，无需重复",
    ("declined", "accepted"): "您已拒绝此任务",
    ("declined", "declined"): "您已拒绝此任务",
    ("declined", "arrived"): "您已拒绝此任务",
    ("declined", "reported"): "您已拒绝此任务",
}
DONE_TEXT = "已反馈结果，任务已完成"  # any reply after the unit's report

# ---- messages to units ---------------------------------------------------------------------


def door_knock(address: str, honorific: str, on_the_phone: bool = True) -> str:
    """A guard's or grid worker's offer, on a radio screen: the buttons to press. A call
    that has ended is said so: the resident may now be on the way to transfer the money."""
    if on_the_phone:
        situation = (
            f"{honorific}正在接听疑似诈骗电话。请立即上门敲门，让{honorific}挂断电话、不要转账。"
        )
    else:
        situation = (
            f"{honorific}刚与疑似诈骗电话通完话，可能正被诱导转账。"
            f"请立即上门敲门，劝阻{honorific}不要转账。"
        )
    return f"反诈紧急上门：{address}，{situation}接受请按1，拒绝请按2，到达后按3。"


def notice(address: str, honorific: str, closing: bool, on_the_phone: bool = True) -> str:
    """A grid worker told that someone is sent to the door (no reply expected), or that it
    has ended. Who goes is not said: the estate's guards, or the quick police when no guard
    is available."""
    if closing:
        return f"知悉：{address}的反诈事件已结束，无需前往。"
    doing = "疑似正在接听诈骗电话" if on_the_phone else "刚与疑似诈骗电话通完话"
    return f"知悉：{address}，{honorific}{doing}，已派员上门处置，无需回复。"


ADDRESS_UNKNOWN = "地址不详"


def police_subject(name: str, display_name: str, msisdn: str) -> str:
    return f"{name}（{display_name}，{msisdn}）"


def police_dispatch(
    who: str,
    address: str,
    counterpart: str,
    category: str | None,
    duration_s: float,
    severity: str,
    rule_name: str,
) -> str:
    """A patrol's offer: everything the police may know, in one sentence."""
    return (
        f"反诈出警：{who}，地址{address}，正与涉诈号码{counterpart}"
        f"（{category or '未分类'}）通话，已持续{duration_s:g}秒，"
        f"风险等级{SEVERITY_TEXT.get(severity, severity)}"
        f"（规则：{rule_name}）。"
    )


# ---- stand-downs ---------------------------------------------------------------------------

# why a unit is no longer needed, by the dispatch's reason
CANCEL_TEXT = {
    "taken": "已由其他人员接警，您无需前往。",
    "expired": "接警超时，任务已转派，您无需前往。",
    "closed": "事件已结束，您无需前往或请收队。",
}
