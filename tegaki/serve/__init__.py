"""The server: an OpenAI-compatible HTTP API, a terminal chat's engine, and a page of the model's insides.

    engine.py     one thread owns the model; requests take turns one token at a time
    templates.py  chat templates: a checkpoint's own (jinja2, as transformers renders it) or tegaki's default
    api.py        request checking and OpenAI-shaped responses (plain dicts; no web framework)
    insides.py    the page's data: next-token bars, attention maps, the logit lens, the parameter table
    app.py        the ASGI app (Starlette): routes, server-sent events, errors as OpenAI-shaped JSON
    static/       the page itself: hand-written HTML, JS and CSS, served by tegaki (no CDN, no build step)

Nothing in tegaki imports this package except `tegaki/cli/serve.py` and `tegaki/cli/chat.py`.
"""
