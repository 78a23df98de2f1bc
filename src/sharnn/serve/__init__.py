"""`sharnn serve`: a model behind an HTTP API and a web page (the optional `sharnn[serve]` extra).

    engine.py   the worker thread: generations stepped together at a fixed width, texts scored in segments
    app.py      the FastAPI application: routes, request models, limits, errors, server-sent events
    static/     the page served at / (plain HTML, CSS and JavaScript; nothing fetched from elsewhere)
"""
