"""Dataset text on the page is data, never markup: control characters made visible, JSON that
cannot close its ``<script>`` block, inline scripts checked."""

from __future__ import annotations

import json
import math
import re
from typing import Any


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def visible_controls(text: str) -> str:
    """Control characters as visible symbols: C0 and DEL as their Unicode control pictures
    (NUL → ␀, ESC → ␛, DEL → ␡), C1 as ``\\x85``; tab and newlines stay."""

    def picture(match: re.Match[str]) -> str:
        code = ord(match.group(0))
        if code < 0x20:
            return chr(0x2400 + code)
        return "\u2421" if code == 0x7F else f"\\x{code:02x}"

    return _CONTROL.sub(picture, text)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def json_for_script(value: Any) -> str:
    """Strict JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>``, ``&``, U+2028/9, no raw control character."""
    text = json.dumps(_json_safe(value), ensure_ascii=False, sort_keys=True, default=str, allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    # JSON escapes C0 controls itself; DEL and C1 controls would stay raw in the page
    return re.sub(r"[\x7f-\x9f]", lambda m: f"\\u{ord(m.group(0)):04x}", text)


def inline_script(source: str, name: str) -> str:
    """An inline classic ``<script>`` with ``source``; refuses code that could end the block early."""
    if re.search(r"(?i)<(/?)script", source):
        raise ValueError(f"{name} contains '<script' or '</script' and cannot be inlined safely")
    return f"<script>{source}</script>"
