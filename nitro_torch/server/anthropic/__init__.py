"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens."""

from starlette.routing import BaseRoute

from nitro_torch.server.anthropic import messages

routes: list[BaseRoute] = [*messages.routes]
