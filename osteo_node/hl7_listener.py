"""HL7 v2 listener: DXA results arrive as ORU^R01 messages over MLLP and go into `dxa_results`.

Built on python-hl7's asyncio MLLP server (`hl7.mllp.start_hl7_server`, its stream reader's size
limit and its block writer). One connection handles one message at a time, in order (original
acknowledgement mode): the ACK is written only after the result is committed, so an AA means
stored. Answers:

* AA: stored, or already stored (a duplicate: MSA-3 says "duplicate").
* AE: an ORU^R01 the node understood but cannot use: no T-score, a T-score outside -7..+7, a DXA
  date missing or in the future, a patient this node never screened, no screened image of hers
  within `[validation] match_window_days`, a sending facility not in
  `[hl7] allowed_sending_facilities`, or another message type. Resending it will not help.
* AR: not an HL7 message (garbage, no MSH, not MLLP-framed, over `[hl7] max_message_kb`), or the
  database is unavailable (resend later). A frame over the limit or a stream that is not MLLP
  also closes the connection, since the frame boundaries are lost.

The listener never stops on bad input: every failure of one message becomes its answer, every
failure of one connection closes that connection. Log lines carry the message control id
(MSH-10) and the outcome, never the contents of PID.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import threading
import traceback
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type information
from hl7.mllp import start_hl7_server  # type: ignore[import-untyped]
from hl7.mllp.streams import (  # type: ignore[import-untyped]
    CARRIAGE_RETURN,
    END_BLOCK,
    START_BLOCK,
    HL7StreamReader,
    HL7StreamWriter,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import codes, dxa
from .config import Hl7Settings
from .errors import ConfigError, DxaError

log = logging.getLogger(__name__)

AA, AE, AR = "AA", "AE", "AR"
#: Our name in the ACK's MSH-3 when the message names no receiving application.
APPLICATION = "OSTEO_NODE"
#: Seconds a started frame may take to complete; then the connection is closed (a stalled or
#: non-MLLP peer). Idle connections between messages are kept: interface engines hold them open.
FRAME_TIMEOUT_S = 30.0
#: OBX-11 result statuses used: final and corrected (HL7 table 0085). Others (preliminary,
#: deleted, wrong patient, cannot be obtained...) are not results to validate against.
USABLE_STATUSES = ("F", "C", "")
#: HL7 escape sequences for the default delimiters (the text of MSA-3 may contain "ORU^R01").
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\",
            "\r": " ", "\n": " "}
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Answer:
    """The acknowledgement of one message: code (AA/AE/AR), text for MSA-3, and MSH-10."""

    code: str
    text: str
    control_id: str = ""


@dataclass(frozen=True)
class Oru:
    """What an ORU^R01 says about one DXA examination."""

    control_id: str
    #: PID-3 repetitions: (ID, assigning authority namespace) and, when present, (ID, its
    #: universal ID), in message order.
    patient_keys: tuple[tuple[str, str], ...]
    dxa_date: dt.date
    #: Site -> T-score (the lowest when a site is reported twice, e.g. left and right femur).
    t_scores: dict[str, float] = field(default_factory=dict)
    #: An OBX-11 "C": the result corrects an earlier one.
    correction: bool = False


def _get(segment: hl7.Segment, field_num: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str:
    """One (sub)component of a segment, unescaped, or "" when absent."""
    try:
        return str(segment.extract_field(1, field_num, rep, comp, sub)).strip()
    except (IndexError, KeyError, TypeError, ValueError):
        return ""


def _repetitions(segment: hl7.Segment, field_num: int) -> int:
    try:
        value = segment(field_num)
    except (IndexError, KeyError, TypeError):
        return 0
    return len(value) if isinstance(value, hl7.Field) else 1


def _segments(message: hl7.Message, name: str) -> list[hl7.Segment]:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


def _date(value: str, where: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        raise DxaError(f"{where} is not a date (YYYYMMDD...)") from None


def parse(block: bytes) -> hl7.Message:
    """An MLLP block's bytes as an HL7 message; ValueError when it is not one."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")  # HL7 v2's usual 8-bit character set (MSH-18 8859/1)
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 \t")
    if not text.startswith("MSH") or len(text) < 8:
        raise ValueError("not an HL7 v2 message (it does not start with MSH)")
    try:
        message = hl7.parse(text)
        msh = message.segment("MSH")
    except Exception as exc:  # python-hl7 raises several types on malformed text
        raise ValueError(f"unparseable HL7 ({type(exc).__name__})") from None
    if not _get(msh, 9, 1, 1):
        raise ValueError("MSH-9 (message type) is empty")
    return message


def control_id(message: hl7.Message) -> str:
    """MSH-10, printable and at most 64 characters (it goes into log lines and source_ref)."""
    return _PRINTABLE.sub("?", _get(message.segment("MSH"), 10))[:64]


def _t_score(obx: hl7.Segment, code: str) -> float:
    """The number in OBX-5 (value type NM, or SN with no comparator or "=")."""
    if _get(obx, 2).upper() == "SN":
        comparator, raw = _get(obx, 5, 1, 1), _get(obx, 5, 1, 2)
        if comparator not in ("", "="):
            raise DxaError(f"OBX-5 of {code} is a bound ({comparator}), not a T-score")
    else:
        raw = _get(obx, 5)
    try:
        return float(raw)
    except ValueError:
        raise DxaError(f"OBX-5 of {code} is not a number") from None


def _loinc(obx: hl7.Segment) -> str | None:
    """The T-score LOINC code of an OBX-3 (identifier or alternate identifier), else None."""
    for code_comp, system_comp in ((1, 3), (4, 6)):
        code, system = _get(obx, 3, 1, code_comp), _get(obx, 3, 1, system_comp).upper()
        if code in codes.DXA_T_SCORE_SITES and system in (codes.LOINC_V2, "LOINC", ""):
            return code
    return None


def read_oru(message: hl7.Message) -> Oru:
    """The DXA examination an ORU^R01 reports; DxaError (the reason) when it reports none usable."""
    pids = _segments(message, "PID")
    if len(pids) != 1:
        raise DxaError(f"expected one PID segment, found {len(pids)}")
    pid = pids[0]
    keys: list[tuple[str, str]] = []
    for rep in range(1, max(1, _repetitions(pid, 3)) + 1):
        patient_id = _get(pid, 3, rep, 1)
        if patient_id:
            namespace, universal = _get(pid, 3, rep, 4, 1), _get(pid, 3, rep, 4, 2)
            keys.append((patient_id, namespace))
            if universal:
                keys.append((patient_id, universal))
    if not keys:
        raise DxaError("PID-3 has no patient identifier")
    scores: dict[str, float] = {}
    dates: set[dt.date] = set()
    correction = False
    obr_date: dt.date | None = None
    for segment in message:
        name = str(segment[0]).strip()
        if name == "OBR":
            obr_date = _date(_get(segment, 7), "OBR-7")
            continue
        if name != "OBX":
            continue
        code = _loinc(segment)
        status = _get(segment, 11).upper()
        if code is None or status not in USABLE_STATUSES:
            continue
        when = _date(_get(segment, 14), "OBX-14") or obr_date
        if when is None:
            raise DxaError(f"no DXA date for {code} (OBX-14 or OBR-7)")
        value = _t_score(segment, code)
        site = codes.DXA_T_SCORE_SITES[code]
        scores[site] = min(value, scores.get(site, value))
        dates.add(when)
        correction = correction or status == "C"
    if not scores:
        raise DxaError("no final T-score: no OBX with LOINC " + ", ".join(codes.DXA_T_SCORE_SITES)
                       + " and OBX-11 F or C")
    if len(dates) > 1:
        raise DxaError("T-scores of different dates in one message: send one examination each")
    return Oru(control_id(message), tuple(keys), dates.pop(), scores, correction)


class Handler:
    """Answers one message at a time: parse, check, pair, record (blocking; the server runs it
    in a thread). Never raises."""

    def __init__(self, engine: Engine, settings: Hl7Settings, match_window_days: int) -> None:
        self.engine = engine
        self.settings = settings
        self.window_days = match_window_days

    def __call__(self, block: bytes) -> tuple[Answer, hl7.Message | None]:
        try:
            message = parse(block)
        except ValueError as exc:
            return Answer(AR, str(exc)), None
        ctrl = control_id(message)
        try:
            return self._answer(message, ctrl), message
        except SQLAlchemyError as exc:
            log.error("HL7 message %s: database unavailable (%s)", ctrl, type(exc).__name__)
            return Answer(AR, "database unavailable: resend later", ctrl), message
        except Exception as exc:  # a bug must not stop the listener; the sender gets an answer
            log.error("HL7 message %s: unexpected %s at %s", ctrl, type(exc).__name__, _where(exc))
            return Answer(AR, f"internal error ({type(exc).__name__}): resend later", ctrl), message

    def _answer(self, message: hl7.Message, ctrl: str) -> Answer:
        msh = message.segment("MSH")
        kind = f"{_get(msh, 9, 1, 1)}^{_get(msh, 9, 1, 2)}".upper()
        if kind != "ORU^R01":
            return Answer(AE, f"message type {kind} is not ORU^R01", ctrl)
        allowed = self.settings.allowed_sending_facilities
        facility = (_get(msh, 4, 1, 1), _get(msh, 4, 1, 2))
        if allowed and not any(part and part in allowed for part in facility):
            return Answer(AE, "sending facility (MSH-4) not in hl7.allowed_sending_facilities", ctrl)
        try:
            oru = read_oru(message)
            accepted = dxa.accept_reported(
                self.engine, oru.patient_keys, oru.dxa_date, oru.t_scores, source="hl7",
                source_ref=f"MSH-10 {ctrl}", window_days=self.window_days, actor="hl7",
                correction=oru.correction)
        except DxaError as exc:
            return Answer(AE, str(exc), ctrl)
        if accepted.recorded.duplicate:
            return Answer(AA, f"duplicate: already stored as DXA result {accepted.recorded.id}", ctrl)
        return Answer(AA, f"stored as DXA result {accepted.recorded.id}", ctrl)


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _where(exc: BaseException) -> str:
    """file:line where `exc` was raised. Logged instead of the message and traceback, which may
    quote the message's contents (database errors quote their parameters: patient IDs)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def ack(answer: Answer, message: hl7.Message | None) -> bytes:
    """The ACK for `answer` (MSH + MSA; MSA-3 carries the text), without MLLP framing."""
    text = _escape(answer.text[:200])
    if message is not None:
        try:
            reply = message.create_ack(answer.code, application=_get(message.segment("MSH"), 5)
                                       or APPLICATION)
            msa = reply.segment("MSA")
            msa.assign_field(text, 3)
            return str(reply).encode("utf-8")
        except Exception:  # an MSH too malformed to mirror: answer with a minimal one
            pass
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    ctrl = _escape(answer.control_id)
    return (f"MSH|^~\\&|{APPLICATION}||||{stamp}||ACK|{uuid.uuid4().hex[:20]}|P|2.5\r"
            f"MSA|{answer.code}|{ctrl}|{text}\r").encode("utf-8")


class Server:
    """The MLLP server: `connection` runs for each client, one message at a time."""

    def __init__(self, handler: Handler, *, max_bytes: int,
                 frame_timeout_s: float = FRAME_TIMEOUT_S) -> None:
        self.handler = handler
        self.max_bytes = max_bytes
        self.frame_timeout_s = frame_timeout_s

    async def connection(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async for block in self._blocks(reader, writer):
                answer, message = await asyncio.get_running_loop().run_in_executor(
                    None, self.handler, block)
                log.info("HL7 message %s: %s %s", answer.control_id or "(no MSH-10)", answer.code,
                         answer.text)
                writer.writeblock(ack(answer, message))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing was acknowledged that was not stored
        except Exception as exc:  # never let one connection's failure reach the server
            log.error("HL7 connection from %s failed: %s at %s", peer, type(exc).__name__,
                      _where(exc))
        finally:
            writer.close()

    async def _blocks(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> AsyncIterator[bytes]:
        """MLLP blocks (without framing) until the peer closes; refuses (AR) and stops on a frame
        that is not MLLP, too large, or stalled."""
        while True:
            first = await reader.read(1)  # idle connections may wait here indefinitely
            if not first:
                return
            if first != START_BLOCK:
                await self._refuse(writer, "not MLLP framed (no <VT> start block): closing")
                return
            try:
                rest = await asyncio.wait_for(reader.readuntil(END_BLOCK + CARRIAGE_RETURN),
                                              self.frame_timeout_s)
            except asyncio.LimitOverrunError:
                await self._refuse(writer, f"message over {self.max_bytes} bytes "
                                           "([hl7] max_message_kb): closing")
                return
            except (TimeoutError, asyncio.TimeoutError):
                await self._refuse(writer, f"incomplete frame after {self.frame_timeout_s:.0f} s: "
                                           "closing")
                return
            yield rest[:-2]

    async def _refuse(self, writer: HL7StreamWriter, reason: str) -> None:
        log.warning("HL7 connection refused a frame: %s", reason)
        writer.writeblock(ack(Answer(AR, reason), None))
        await writer.drain()


class Listener:
    """The HL7 listener in a thread of its own (inside `serve`, or alone in `osteo-node hl7`)."""

    def __init__(self, engine: Engine, settings: Hl7Settings, match_window_days: int, *,
                 frame_timeout_s: float = FRAME_TIMEOUT_S) -> None:
        self.settings = settings
        self.max_bytes = settings.max_message_kb * 1024
        self.server = Server(Handler(engine, settings, match_window_days), max_bytes=self.max_bytes,
                             frame_timeout_s=frame_timeout_s)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="osteo-hl7", daemon=True)
        self.ready = threading.Event()
        self.port: int | None = None
        self.error: BaseException | None = None
        self._stopped: asyncio.Event | None = None

    def start(self) -> "Listener":
        """Bind and serve; ConfigError naming the keys when the address cannot be bound."""
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            self.thread.join()
            self.loop.close()
            raise ConfigError(f"hl7.bind_address / hl7.port: cannot listen on "
                              f"{self.settings.bind_address}:{self.settings.port} "
                              f"({getattr(self.error, 'strerror', None) or self.error})")
        log.info("HL7 listener on %s:%d (MLLP; ORU^R01 DXA results)", self.settings.bind_address,
                 self.port)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        try:
            server = await start_hl7_server(self.server.connection, self.settings.bind_address,
                                            self.settings.port, limit=self.max_bytes)
        except OSError as exc:
            self.error = exc
            self.ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        await self._stopped.wait()
        server.close()
        # Connections idle between messages are closed; a message being stored (in the default
        # executor) is committed before the loop ends, its ACK unsent (the sender resends: AA
        # duplicate).
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_default_executor()

    def check(self) -> None:
        """Health check: raise when the listener's thread has ended."""
        if not self.thread.is_alive():
            raise OSError("HL7 listener stopped")

    def shutdown(self) -> None:
        """Stop accepting, close the loop; a message being stored completes first (its thread)."""
        if self._stopped is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
        log.info("HL7 listener stopped")
