"""What the db engine's command payloads share: strict models (unknown fields refused)
whose name-like fields are checked by the `yakpanel.identifiers` grammars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from yakpanel import identifiers


def checked(check: Callable[..., str], field: str) -> AfterValidator:
    """A payload field checked by its grammar; the message names `field`, never the value."""
    return AfterValidator(lambda v: check(v, field=field))


Password = Annotated[str, checked(identifiers.password, "password")]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")
