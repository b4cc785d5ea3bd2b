"""OpenAI's API: chat completions, responses, completions, embeddings, models, and vLLM's tokenize."""

from starlette.routing import BaseRoute

from nitro_torch.server.openai import chat, completions, embeddings, models, responses, tokenize

routes: list[BaseRoute] = [*chat.routes, *responses.routes, *models.routes, *completions.routes,
                           *tokenize.routes, *embeddings.routes]
