"""A headless Streamlit session: the browser's websocket protocol without a browser, so a load
benchmark measures the server alone (bench.classroom_load).

    async with HeadlessSession("http://127.0.0.1:8501", page="playground") as s:
        seconds = await s.load()                         # first script run of the page, to its end (None: timed out)
        seconds = await s.set_widget("Granularity", "token")   # one control change, to the rerun's end

It speaks what the browser speaks: a ``rerun_script`` BackMsg with the page's name and the
widget states, then reads ForwardMsgs until ``script_finished``. Like a browser it keeps every
widget's value (sent back on each rerun) and honours ``auto_rerun`` (a fragment's ``run_every``:
it sends the fragment's rerun on the same interval until ``stop_auto_rerun`` or a full rerun),
so idle sessions cost the server what idle tabs cost. It does not render anything.
"""
from __future__ import annotations

import asyncio
import time

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

# element field -> WidgetState value field the frontend sends for it (the ones the app uses)
_VALUE_FIELDS = {"selectbox": "string_value", "radio": "string_value", "number_input": None,
                 "checkbox": "bool_value", "toggle": "bool_value", "text_input": "string_value"}


class ScriptError(RuntimeError):
    """The page raised (an exception element) or did not compile."""


class HeadlessSession:
    def __init__(self, url: str, page: str = "", timeout_s: float = 300.0, query: str = ""):
        self.ws_url = url.replace("http://", "ws://").rstrip("/") + "/_stcore/stream"
        self.page, self.query, self.timeout_s = page, query, timeout_s
        self.page_hash = ""
        self.widgets: dict[str, dict] = {}       # label -> {"id", "kind", "state": WidgetState}
        self.exceptions: list[str] = []
        self.script_runs = 0                      # full runs and fragment runs that finished
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._timers: dict[str, asyncio.Task] = {}
        self._finished: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> "HeadlessSession":
        self._ws = await websockets.connect(self.ws_url, subprotocols=["streamlit"], max_size=None,
                                            open_timeout=self.timeout_s, ping_interval=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._timers.values():
            task.cancel()
        self._timers.clear()
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()

    # -- what a user does ------------------------------------------------------------------------
    async def load(self) -> float | None:
        """Open the page (a full script run); seconds until the run finished (None: not within the
        session's ``timeout_s``)."""
        return await self._rerun()

    async def set_widget(self, label: str, value) -> float | None:
        """Change the control labelled ``label`` to ``value``; seconds until the rerun finished (None:
        not within ``timeout_s``)."""
        widget = self.widgets.get(label)
        if widget is None:
            raise KeyError(f"no widget labelled {label!r}; have {sorted(self.widgets)}")
        state = widget["state"]
        field = _VALUE_FIELDS.get(widget["kind"]) or ("int_value" if isinstance(value, int) else "double_value")
        setattr(state, field, value)
        return await self._rerun()

    # -- protocol ----------------------------------------------------------------------------------
    async def _rerun(self, fragment_id: str = "") -> float | None:
        """Seconds from the request to the end of the full run it causes; None when that run has
        not ended after ``timeout_s`` (an overloaded server queues it behind other sessions' runs)."""
        while not self._finished.empty():
            self._finished.get_nowait()
        start = time.perf_counter()
        await self._send_rerun(fragment_id)
        while True:
            left = self.timeout_s - (time.perf_counter() - start)
            try:
                status = await asyncio.wait_for(self._finished.get(), max(left, 0.001))
            except asyncio.TimeoutError:
                return None
            if status == ForwardMsg.FINISHED_WITH_COMPILE_ERROR:
                raise ScriptError(f"{self.page}: script did not compile")
            if status == ForwardMsg.FINISHED_SUCCESSFULLY:
                if self.exceptions:
                    raise ScriptError(f"{self.page}: {self.exceptions[0][:500]}")
                return time.perf_counter() - start

    async def _send_rerun(self, fragment_id: str = "", auto: bool = False) -> None:
        msg = BackMsg()
        rerun = msg.rerun_script
        rerun.query_string = self.query
        rerun.page_name = self.page
        rerun.page_script_hash = self.page_hash
        rerun.widget_states.widgets.extend(w["state"] for w in self.widgets.values())
        if fragment_id:
            rerun.fragment_id = fragment_id
            rerun.is_auto_rerun = auto
        await self._ws.send(msg.SerializeToString())

    async def _read(self) -> None:
        async for data in self._ws:
            msg = ForwardMsg()
            msg.ParseFromString(data)
            kind = msg.WhichOneof("type")
            if kind == "new_session" and not msg.metadata.run.fragment_ids:
                # A full run starts: the browser drops every auto-rerun timer (the run re-registers
                # the fragments that still poll) and the page's old exceptions.
                for fragment_id in list(self._timers):
                    self._stop_timer(fragment_id)
                self.exceptions.clear()
            elif kind == "navigation" and msg.navigation.page_script_hash:
                self.page_hash = msg.navigation.page_script_hash
            elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                self._element(msg.delta.new_element)
            elif kind == "auto_rerun":
                self._start_timer(msg.auto_rerun.fragment_id, msg.auto_rerun.interval)
            elif kind == "stop_auto_rerun":
                for fragment_id in msg.stop_auto_rerun.fragment_ids:
                    self._stop_timer(fragment_id)
            elif kind == "script_finished":
                self.script_runs += 1
                self._finished.put_nowait(msg.script_finished)

    def _element(self, element) -> None:
        kind = element.WhichOneof("type")
        if kind == "exception":
            self.exceptions.append(f"{element.exception.type}: {element.exception.message}")
            return
        if kind not in _VALUE_FIELDS:
            return
        proto = getattr(element, kind)
        label = proto.label
        known = self.widgets.get(label)
        if known is not None and known["id"] == proto.id:
            return
        state = WidgetState(id=proto.id)
        if kind in ("selectbox", "radio"):
            if proto.HasField("default") and len(proto.options) > proto.default:
                state.string_value = proto.options[proto.default]
        elif kind in ("checkbox", "toggle"):
            state.bool_value = proto.default
        elif kind == "number_input":
            if proto.data_type == proto.INT:
                state.int_value = int(proto.default)
            else:
                state.double_value = float(proto.default)
        elif kind == "text_input":
            state.string_value = proto.default
        self.widgets[label] = dict(id=proto.id, kind=kind, state=state)

    def _start_timer(self, fragment_id: str, interval: float) -> None:
        self._stop_timer(fragment_id)

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval)
                await self._send_rerun(fragment_id, auto=True)
        self._timers[fragment_id] = asyncio.create_task(tick())

    def _stop_timer(self, fragment_id: str) -> None:
        task = self._timers.pop(fragment_id, None)
        if task is not None:
            task.cancel()

    @property
    def polling(self) -> int:
        """How many fragment timers this session runs (0 for an idle page)."""
        return len(self._timers)
