"""The base of every request schema."""

from pydantic import BaseModel, ConfigDict


class LenientModel(BaseModel):
    """Unknown fields are ignored, as OpenAI and Anthropic do; flags are StrictBool where used, since OpenAI
    answers 400 to `"stream": "yes"`."""

    model_config = ConfigDict(extra="ignore")
