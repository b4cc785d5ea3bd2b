"""Nitro's own routes: loadmodel, unloadmodel, modelstatus, chat_completion, embedding, healthz."""

from starlette.routing import BaseRoute

from nitro_torch.server.nitro import api

routes: list[BaseRoute] = [*api.routes]
