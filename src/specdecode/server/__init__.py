"""``specdecode serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn).

* ``requests``: request bodies -> what to generate (400 naming the field otherwise);
* ``worker``: generations one at a time on a thread, from a bounded queue (429 when full);
* ``metrics``: Prometheus metrics under vLLM's names;
* ``app``: the routes, responses and server-sent events.
"""

from .app import SPEC_STATS_KEY, Server, create_app
from .requests import RequestError

__all__ = ["SPEC_STATS_KEY", "RequestError", "Server", "create_app"]
