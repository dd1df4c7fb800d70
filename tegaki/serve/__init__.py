"""The server: an OpenAI-compatible HTTP API, a terminal chat's engine, and a page of the model's insides.

    engine.py     one thread owns the model; requests take turns one token at a time
    served.py     the model served: loaded once, with its tokenizer and chat template (tegaki/chat_template.py)
    api.py        checking a request in the OpenAI API's shapes (plain dicts; no web framework)
    responses.py  OpenAI-shaped answers, stream chunks and logprobs
    insides.py    the page's data: next-token bars, attention maps, the logit lens, the parameter table
    app.py        the ASGI app (Starlette): routes, server-sent events, errors as OpenAI-shaped JSON
    static/       the page itself: hand-written HTML, JS and CSS, served by tegaki (no CDN, no build step)

Nothing in tegaki imports this package except `tegaki/cli/serve.py` and `tegaki/cli/chat.py`.
"""
