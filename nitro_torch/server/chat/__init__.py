"""One chat, whichever API asked for it: the request schema, template, tools, structured output, budget,
and the generation in flight."""
