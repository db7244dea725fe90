"""`qwen2audio serve`: an OpenAI-compatible HTTP server over a model (docs/serving.md).

    backend.py        what the HTTP layer needs from a model (Backend, Handle, QueueFull), and
                      SchedulerBackend: a loaded Qwen2Audio decoding concurrent requests in one batch
    app.py            the FastAPI application: limits, API key, errors, /health, /v1/models, /metrics
    chat.py           POST /v1/chat/completions (plain and streamed)
    transcription.py  POST /v1/audio/transcriptions and /v1/audio/translations
    openai_format.py  request schemas and response bodies in OpenAI's shapes
    errors.py         APIError and OpenAI's error body
    audio_input.py    audio in a request -> checked 16 kHz samples (base64, data: URLs, allowed URLs and files)
    download.py       fetching an allowed http(s) URL without reaching private addresses
    handles.py        waiting on a backend's handles from async code, cancelling when the client leaves
    metrics.py        counters and histograms in Prometheus' text format
    defaults.py       the default limits (light: the command's --help shows them)
    cli.py            the `serve` command

Importing this package is light: FastAPI, uvicorn and torch are imported by the modules that use them,
so `qwen2audio --help` stays fast and a missing extra is one clear line.
"""
