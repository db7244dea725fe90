"""The server's default limits, in one light module: the command line shows them in --help without
importing FastAPI, numpy or torch."""

MAX_BODY_MB = 25  # largest request body: OpenAI's own limit on audio uploads
MAX_AUDIO_SECONDS = 600.0  # audio per request; chat prompts also have the model's context as a limit
MAX_TOKENS = 1024  # new tokens per request: the most one may ask for, and what it gets when it does not say
MAX_QUEUE = 16  # requests that may wait for the model; more are answered 429
SHUTDOWN_SECONDS = 30.0  # how long requests in flight may go on after SIGINT / SIGTERM
MAX_BATCH = 8  # requests decoded together (the scheduler's KV cache slots); more wait in the queue
