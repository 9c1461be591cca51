"""The model id rule, checked wherever an id enters (``Finetune.open``, ``ModelIndex.add``, the server).

An id is 1-64 characters of ASCII letters, digits, ``_``, ``-`` and ``+``, starting with a letter or a
digit, and is none of the sentinels below (``base``, ``auto``, ``__base__``).
The rule keeps every indexed model servable: PEFT refuses adapter names with ``.``, and ids appear
in URLs (``/v1/adapters/{id}``) and file names. A default id taken from a directory name is made to
fit (``lora-v1.5`` -> ``lora-v1_5``).
"""

from __future__ import annotations

import logging
import re

from delta_router.errors import InvalidModelIdError

logger = logging.getLogger(__name__)

MAX_LENGTH = 64
# The sentinels, defined here (the lowest layer that knows model names) and imported everywhere:
BASE_MODEL_NAME = "base"  # the base model, as users name it: ``eval base``, the server's ``model``
AUTO_MODEL_NAME = "auto"  # the server's "let the router choose"
BASE_ADAPTER = "__base__"  # no adapter: a router's fallback target and a mixed batch's base rows
RESERVED = frozenset({BASE_MODEL_NAME, AUTO_MODEL_NAME, BASE_ADAPTER})
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_+-]")

RULE = (
    f"1-{MAX_LENGTH} characters of letters, digits, '_', '-' and '+', starting with a letter or digit, "
    f"and not one of {', '.join(sorted(RESERVED))}"
)


def check_model_id(model_id: object) -> str:
    """``model_id`` if it follows the rule, else ``InvalidModelIdError`` naming the rule."""
    if (
        not isinstance(model_id, str)
        or len(model_id) > MAX_LENGTH
        or not _VALID.fullmatch(model_id)
        or model_id.lower() in RESERVED
    ):
        raise InvalidModelIdError(f"invalid model id {model_id!r}: an id is {RULE}")
    return model_id


def id_from_name(name: str) -> str:
    """A valid id from a directory name: other characters become ``_``; refused if nothing is left."""
    candidate = _INVALID_CHARS.sub("_", name).lstrip("_+-")[:MAX_LENGTH]
    if candidate != name:
        logger.warning("model id %r taken from the directory name %r (ids are %s)", candidate, name, RULE)
    try:
        return check_model_id(candidate)
    except InvalidModelIdError:
        raise InvalidModelIdError(f"cannot make a model id from the name {name!r}: give one (--id)") from None
