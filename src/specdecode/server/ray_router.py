"""The request router of ``serve --ray``'s proxy: Serve's power of two choices over every replica.

Serve's default router first tries the replicas on the proxy's own node. A replica takes its
queue as well as its batch (``ray_serve.deployment_options``), so a local replica would be tried
first and take requests until its queue was full while another node's replica stood idle. This
router draws its two candidates from all replicas; of those that accept, the one with fewer
requests in flight gets the request, and requests are routed in the order they came. Imported by
name in the proxy (``ROUTER``); Ray must already be set up, as in any Serve process.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, RequestRouter


class LeastLoadedOfTwo(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
