"""The one digest of the project: a short SHA-256 of a payload's canonical JSON.

Asset identity (:mod:`stages.optimize.identity`), checkpoint compatibility
(:meth:`~stages.optimize.config.OptimizeConfig.resume_digest`), export settings
(``pipeline/export.py``) and evaluation settings (``pipeline/evaluate/``) are all this function
over a different payload. Their values are stored in datasets (asset ids, ``config_digest``,
``export_digest``, ``eval_digest``) and checkpoints, so the encoding never changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(payload: Any, hex_digits: int = 12, *, compact: bool = True) -> str:
    """The first ``hex_digits`` hex digits of the SHA-256 of ``payload`` as JSON with sorted keys
    (values JSON lacks as ``str``).

    ``compact`` (``","``/``":"`` separators) is the asset identity's encoding; ``compact=False``
    (``", "``/``": "``) the one resume, export and evaluation digests were first stored with.
    """
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(payload, sort_keys=True, separators=separators, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:hex_digits]
