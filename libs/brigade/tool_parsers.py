"""Incremental scanning of model output for tool calls, in the formats of vLLM's `--tool-call-parser` names.

`Scanner` turns text deltas into a list of events: plain text (str) and complete calls (`Call`). It only
decides something once no later text can change the decision, so the events do not depend on how the
output was split into deltas (the non-streamed parse is the same scanner fed the whole text at once).
Malformed output is released as text, never raised.

Whitespace rule: trailing whitespace of the text is held back until more text follows; whitespace right
before a call, left at the end once a call was made, or leading text that only follows calls, is dropped
(so no stray newlines around calls).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, NamedTuple

PARSERS = ("hermes", "llama3_json", "mistral")


class Call(NamedTuple):
    """A complete tool call found in the output: the function name and its arguments as a JSON string."""

    name: str
    arguments: str


Event = str | Call


@dataclass(frozen=True)
class Style:
    """How calls are written: what starts them, where, and how several are separated."""

    opener: str  # marker that starts calls anywhere in the text; "" when calls may only start the output
    lead: str = ""  # optional marker before the first call when calls start the output (llama3's python tag)
    first: str = "{"  # the character the call block starts with after opener/lead and whitespace
    layout: Literal["single", "array", "sequence"] = "single"
    close: str = ""  # optional closing tag after each call ("single" layout)


STYLES = {
    "hermes": Style("<tool_call>", close="</tool_call>"),
    "mistral": Style("[TOOL_CALLS]", first="[", layout="array"),
    "llama3_json": Style("", lead="<|python_tag|>", layout="sequence"),
}
REQUIRED = Style("", first="[", layout="array")
"""tool_choice "required": the output is the JSON array the constraint asks for, `[{"name", "parameters"}]`."""

# What matters to find where a JSON object ends: brackets and quotes outside strings, quotes and escapes inside.
_STRUCTURE = re.compile(r'[{}\[\]"]')
_IN_STRING = re.compile(r'["\\]')
_WS = " \t\r\n"  # JSON's whitespace
_NON_WS = re.compile(r"[^ \t\r\n]")

State = Literal["text", "start", "open", "item", "obj", "after", "sep"]


def detect_parser(chat_template: str) -> str:
    """Guess the tool-call parser from a Jinja chat template's source ("hermes" when nothing matches)."""
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or ("ipython" in chat_template and "parameters" in chat_template):
        return "llama3_json"
    return "hermes"


def to_call(obj: object, names: Collection[str]) -> Call | None:
    """`obj` as a call of one of `names` ({"name", "arguments" or "parameters": object}), or None."""
    if not isinstance(obj, dict) or not isinstance(name := obj.get("name"), str) or name not in names:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:
        args = {}
    elif isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return Call(name, json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _skip_ws(s: str, i: int) -> int:
    m = _NON_WS.search(s, i)
    return len(s) if m is None else m.start()


def _held_prefix(s: str, marker: str) -> int:
    """Length of the longest end of `s` that is a proper beginning of `marker` (it may grow into one)."""
    for n in range(min(len(s), len(marker) - 1), 0, -1):
        if marker.startswith(s[-n:]):
            return n
    return 0


class Scanner:
    """Incremental tool-call scanner for one output; `names` are the functions a call may name."""

    def __init__(self, style: Style, names: Collection[str]) -> None:
        self.style = style
        self.names = names
        self.calls = 0
        self._state: State = "text" if style.opener else "start"
        self._buf = ""  # text not yet emitted or decided; released as text if its call block fails
        self._pos = 0  # how far into _buf the current call block has been read
        self._depth = 0  # bracket depth of the object being read, from _pos (resumed across feeds)
        self._scan = 0  # where reading that object resumes
        self._in_string = False  # ... and whether that is inside a JSON string
        self._held = ""  # trailing whitespace of the emitted text, not yet sent
        self._sent = False  # some text was emitted
        self._out: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        """Scan the next delta; returns the events that it decided."""
        self._buf += text
        while self._step():
            pass
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Event]:
        """End of output: what is still undecided is text, except a dangling closing tag after a call."""
        if self._state != "after":
            self._text(self._buf)
        self._buf = ""
        if self._held and not self.calls:
            self._out.append(self._held)
        self._held = ""
        out, self._out = self._out, []
        return out

    def _text(self, s: str) -> None:
        s = self._held + s
        if self.calls and not self._sent:
            s = s.lstrip(_WS)  # text that only follows calls starts at its first word
        keep = len(s.rstrip(_WS))
        if keep:
            self._out.append(s[:keep])
            self._sent = True
        self._held = s[keep:]

    def _call(self, call: Call, end: int) -> None:
        self._held = ""  # whitespace before a call is dropped
        self._out.append(call)
        self.calls += 1
        self._buf, self._pos, self._state = self._buf[end:], 0, "after"

    def _fail(self, upto: int) -> None:
        """The call block is malformed: what was read of it (up to `upto`) is text, scanning resumes after."""
        self._text(self._buf[:upto])
        self._buf, self._pos, self._state = self._buf[upto:], 0, "text"

    def _goto(self, state: State, pos: int) -> bool:
        self._state, self._pos, self._depth, self._scan, self._in_string = state, pos, 0, pos, False
        return True

    def _step(self) -> bool:
        """Make one decision; False when more text is needed."""
        st, buf, state = self.style, self._buf, self._state
        if state == "text":
            return self._plain()
        if state == "obj":
            return self._object()
        j = _skip_ws(buf, self._pos)
        if state == "start":
            if st.lead and buf.startswith(st.lead, j):
                j = _skip_ws(buf, j + len(st.lead))
            elif st.lead and j < len(buf) and st.lead.startswith(buf[j:]):
                return False  # may still become the lead marker
            if j == len(buf):
                return False
            if buf[j] != st.first:
                self._fail(len(buf))  # not a call: the whole output is text
                return False
            return self._goto("item", j + 1) if st.layout == "array" else self._goto("obj", j)
        rest = buf[j:]
        if state == "after" and len(rest) < len(st.close) and st.close.startswith(rest):
            return False  # whitespace, maybe the start of the closing tag
        if j == len(buf):
            return False
        c = buf[j]
        if state == "open":
            if c != st.first:
                self._fail(j)
                return True
            return self._goto("item", j + 1) if st.layout == "array" else self._goto("obj", j)
        if state in ("item", "sep"):
            if c == "]" and state == "item":  # the end of the array (also after a trailing comma)
                self._buf, self._state = buf[j + 1:], "text"
            elif c == "{":
                return self._goto("obj", j)
            else:
                self._fail(j)
            return True
        # state "after": what follows a call
        if st.layout == "single":
            if st.close and rest.startswith(st.close):
                self._buf = buf[j + len(st.close):]
            self._state = "text"
        elif st.layout == "array" and c == ",":
            self._buf = buf[j + 1:]  # a separator after a call is dropped, even if no call follows
            return self._goto("item", 0)
        elif st.layout == "array" and c == "]":
            self._buf, self._state = buf[j + 1:], "text"
        elif st.layout == "array":
            self._fail(j)
        elif c == ";":
            self._buf = buf[j + 1:]
            return self._goto("sep", 0)
        elif c == "{":  # llama3 calls may also be separated by whitespace alone
            return self._goto("obj", j)
        else:
            self._state = "text"  # the text after the calls
        return True

    def _plain(self) -> bool:
        """Text: with an opener, look for it (holding back a possible partial one); else all of it is text."""
        buf, opener = self._buf, self.style.opener
        at = buf.find(opener) if opener else -1
        if at < 0:
            keep = _held_prefix(buf, opener) if opener else 0
            self._text(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        self._text(buf[:at])
        self._buf = buf[at:]
        return self._goto("open", len(opener))

    def _object(self) -> bool:
        """Read the JSON object at _pos (resuming where the last feed stopped) and decide once it closes."""
        buf, i = self._buf, self._scan
        while True:
            if self._in_string:
                m = _IN_STRING.search(buf, i)
                if m is None or m.group() == "\\" and m.end() == len(buf):  # wait for the escaped character
                    self._scan = len(buf) if m is None else m.start()
                    return False
                i = m.end() + (m.group() == "\\")
                self._in_string = m.group() == "\\"
                continue
            m = _STRUCTURE.search(buf, i)
            if m is None:
                self._scan = len(buf)
                return False
            i = m.end()
            if m.group() == '"':
                self._in_string = True
                continue
            self._depth += 1 if m.group() in "{[" else -1
            if self._depth == 0:
                break
        try:
            call = to_call(json.loads(buf[self._pos:i]), self.names)
        except ValueError:
            call = None
        if call is None:
            self._fail(i)
        else:
            self._call(call, i)
        return True
