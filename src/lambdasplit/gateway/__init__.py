"""The private gateway on the device: an OpenAI-compatible API over split inference, and the web page.

    app.py        FastAPI routes in OpenAI's shapes (chat, completions, images, models), SSE streaming
    engines.py    weights loaded once; one device session per request (client/session.py)
    wire.py       what crossed the wire for a request, from the real capture (the page's panel)
    privacy.py    what the split does not hide, from the audit's measured figures (data/)
    commands.py   `lambdasplit gateway`
    static/       the page (chat view, image view, wire panel); no external CDN
"""
