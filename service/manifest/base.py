"""What every manifest section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from service.uris import has_userinfo

# Errors whose input must not be echoed back to the user (and so to the logs).
URL_CREDENTIALS_ERROR = "url_credentials"
SECRET_ERROR_TYPES = (URL_CREDENTIALS_ERROR,)


def refuse_credentials(url: str, advice: str) -> None:
    """A URL with ``user:password@``: an error whose message does not repeat the URL."""
    if has_userinfo(url):
        raise PydanticCustomError(
            URL_CREDENTIALS_ERROR,
            "credentials in the URL would be logged and saved in run.json: {advice}",
            {"advice": advice},
        )


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
