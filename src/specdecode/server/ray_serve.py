"""``specdecode serve --ray``: the same OpenAI-compatible app as Ray Serve replicas.

Each replica loads its own decoder, engine and worker (``app.Server``), on ``threads`` llama.cpp
threads and as many Ray CPUs, so replicas on one machine do not fight over cores. Ray Serve's
proxy routes each request to the less busy of two replicas (power of two choices) and, between
``min_replicas`` and ``max_replicas``, adds or removes replicas to keep about ``max_batch``
requests in flight on each. The proxy hands a request to a replica as soon as its headers have
arrived, and the body follows from there; so a replica takes its batch and its queue
(``max_ongoing_requests`` = ``max_batch + max_queue``), and requests wait in the replica's own
queue, as direct serving does (``queue_timeout``, then 429). A client that stalls its body then
holds a place in a queue, never a slot, and gets 408 after ``body_timeout`` as it would without
Ray. The router (``ray_router``) sends each request to the less busy of two replicas drawn from
all of them, wherever they run, and holds at most ``max_queue`` more, while every replica is full or none has started
yet (autoscaling from zero), and past them answers 429 with Retry-After. Serve cancels the
request inside the replica when its client disconnects, which frees the slot as direct serving
does. Idle keep-alive connections are closed by the proxy after ``keep_alive`` seconds.

/health and /metrics are answered by small deployments of their own (``Probe``), so that a
probe never waits behind generations for a slot. Every replica pushes its metric samples each
``METRICS_PUSH_S`` to one named actor (``MetricsBoard``); /metrics returns all of them under
vLLM's names, each sample labelled with its ``replica``. A replica that stops pushing drops out
after ``METRICS_STALE_S``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, replace

from ..config import DEFAULT_KEEP_ALIVE_S, DEFAULT_SHUTDOWN_GRACE_S, SpecDecodeError
from .app import ModelSpec, Server, create_app
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

APP_NAME = "specdecode"  # the Serve application
DEPLOYMENT = "specdecode"  # its one deployment; a replica's actor is SERVE_REPLICA::APP#DEPLOYMENT#<id>
BOARD_NAMESPACE = "specdecode"
METRICS_PUSH_S = 1.0  # how often a replica sends its metrics to the board
SNAPSHOT_METRIC = "specdecode:metrics_snapshot_time_seconds"  # when a replica read what it pushed
METRICS_STALE_S = 5.0  # a replica silent for this long (gone) leaves /metrics
HEALTH_CHECK_PERIOD_S = 2.0  # Serve asks each replica this often; a dead one is replaced
HEALTH_CHECK_TIMEOUT_S = 10.0
PROBES = ("health", "metrics")  # paths answered beside the replicas, never queued behind generations
RETRY_AFTER_S = 5  # what a client refused by the router is told (Serve's setting is one fixed number)
ROUTER = "specdecode.server.ray_router.LeastLoadedOfTwo"  # the proxy's router: any node's replica
LOCAL_IP = "127.0.0.1"  # a local Ray instance listens on and talks to loopback only


def local_only_environment() -> None:
    """Make a local Ray instance stay on loopback; call before ``ray`` is imported. Ray maps a node
    IP of 127.0.0.1 to the machine's external interface unless multi-machine clusters are off
    (its switch for macOS and Windows), and reports usage statistics unless told not to."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@dataclass(frozen=True)
class RayOptions:
    """Where and how many: ``replicas`` fixed, or autoscaling between ``min_replicas`` and
    ``max_replicas``; ``address`` joins an existing cluster (None: a local Ray instance)."""

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    address: str | None = None
    threads: int | None = None  # per replica; None: ``default_threads``

    def validate(self) -> RayOptions:
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise SpecDecodeError("replicas", "give either --replicas or --min-replicas/--max-replicas, not both")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise SpecDecodeError("min_replicas", "autoscaling needs both --min-replicas and --max-replicas")
        for name in ("replicas", "max_replicas", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SpecDecodeError(name, f"must be >= 1 (got {value})")
        if self.min_replicas is not None:
            if self.min_replicas < 0:
                raise SpecDecodeError("min_replicas", f"must be >= 0 (got {self.min_replicas})")
            if self.min_replicas > self.max_replicas:
                raise SpecDecodeError("min_replicas", f"must be <= --max-replicas ({self.min_replicas} > "
                                                      f"{self.max_replicas})")
        return self

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.max_replicas is not None else (self.replicas or 1)

    @property
    def fewest_replicas(self) -> int:
        return self.min_replicas if self.min_replicas is not None else (self.replicas or 1)


def default_threads(options: RayOptions, node_cpus: list[int]) -> int:
    """Threads per replica: on a local instance this machine's cores shared by the most replicas
    there may be; on a cluster the smallest node's cores (one replica a node)."""
    if options.threads is not None:
        return options.threads
    if options.address is None:
        return max(1, min(node_cpus) // options.most_replicas)
    return max(1, min(node_cpus))


def deployment_options(options: RayOptions, threads: int, max_batch: int, max_queue: int, grace: float) -> dict:
    """Ray Serve's settings for the deployment (``serve.deployment(**...)``)."""
    scaling = {"num_replicas": options.replicas or 1}
    if options.max_replicas is not None:
        scaling = {"autoscaling_config": {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "initial_replicas": max(1, options.min_replicas),
            # a replica is fully used once its batch is full; more in flight on average: add one
            "target_ongoing_requests": max_batch,
        }}
    return {
        **scaling,
        "ray_actor_options": {"num_cpus": threads},
        # a replica takes its batch and its queue: the proxy routes a request when its headers have
        # come, so a request still sending its body must not hold one of the batch's places (a few
        # stalled clients would stall every other); the router holds max_queue more while every
        # replica is full or starting, and past them answers 429 with Retry-After
        "max_ongoing_requests": max_batch + max_queue,
        "max_queued_requests": max_queue,
        "request_router_config": {"request_router_class": ROUTER},
        "backpressure_config": {"status_code": 429, "retry_after_s": RETRY_AFTER_S},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": grace + 2,
        "max_constructor_retry_count": 2,  # a model that failed to load twice will not load (Serve's default: 20)
    }


# ---- metrics: one endpoint for every replica ------------------------------------------------
def merge_metrics(by_replica: dict) -> bytes:
    """Prometheus text of every replica's metric families (``registry.collect()``), each sample
    labelled with its replica, one family per name."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric

    merged: dict[str, Metric] = {}
    for replica, families in sorted(by_replica.items()):
        for family in families:
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]

    class Merged:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class MetricsBoard:
    """A Ray actor holding each replica's latest metric families."""

    def __init__(self):
        self.latest: dict[str, tuple[float, list]] = {}  # replica -> (when pushed, families)

    def push(self, replica: str, families: list) -> None:
        self.latest[replica] = (time.monotonic(), families)

    def render(self) -> bytes:
        now = time.monotonic()
        self.latest = {r: v for r, v in self.latest.items() if now - v[0] < METRICS_STALE_S}
        return merge_metrics({r: families for r, (_, families) in self.latest.items()})


def _board(app_name: str):
    import ray

    return ray.remote(MetricsBoard).options(name=f"metrics-{app_name}", namespace=BOARD_NAMESPACE,
                                            get_if_exists=True, lifetime="detached", num_cpus=0).remote()


# ---- the deployment -----------------------------------------------------------------------
def _serve_grpc_on_loopback() -> None:
    """On a local-only instance, keep the replica's inter-deployment gRPC server (Ray Serve binds it
    to every interface, ``[::]:0``, whatever the node IP) on loopback too. Runs in the replica
    before Serve starts that server; a Ray without the hook is left alone (the tests' listener
    check would show it)."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    from ray.serve._private import replica

    add = getattr(replica, "add_port_to_grpc_server", None)
    if add is None or getattr(add, "loopback", False):
        return

    def on_loopback(server, address: str):
        return add(server, address.replace("[::]", LOCAL_IP))

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


class Replica:
    """One Serve replica: a loaded ``Server`` (loaded before the replica counts as started), its
    app, and the thread that pushes its metrics."""

    def __init__(self, spec: ModelSpec, model_name: str, server_options: dict):
        from ray import serve

        _serve_grpc_on_loopback()
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.server = Server(spec.load, model_name, replica=self.name, **server_options)
        self.server.load()
        self.board = _board(context.app_name)
        from prometheus_client import Gauge

        # when the families a push carries were read (Unix time): a reader of the board can wait for
        # every replica's snapshot taken after some moment instead of for push periods
        self.snapshot_time = Gauge(SNAPSHOT_METRIC, "When this replica read the metrics it last pushed (Unix time)",
                                   registry=self.server.metrics.registry)
        threading.Thread(target=self._push_metrics, name="specdecode-metrics", daemon=True).start()

    def __serve_build_asgi_app__(self):
        return create_app(self.server)

    def check_health(self) -> None:
        """Serve calls this every HEALTH_CHECK_PERIOD_S; raising has the replica replaced."""
        worker = self.server.worker
        if worker is None or not worker.thread.is_alive():
            raise RuntimeError("the engine's worker thread has stopped")

    def _families(self) -> list:
        self.snapshot_time.set(time.time())
        return list(self.server.metrics.registry.collect())

    def _push_metrics(self) -> None:
        while True:
            self.board.push.remote(self.name, self._families())
            time.sleep(METRICS_PUSH_S)


class Probe:
    """/health or /metrics of the whole application, from a small deployment of its own (no CPU)
    so that probes never wait behind generations for a replica's slot: /health asks Serve's
    controller how many replicas run, /metrics renders the board."""

    def __init__(self, kind: str, app_name: str):
        _serve_grpc_on_loopback()
        self.kind, self.app_name = kind, app_name
        self.board = _board(app_name)

    async def __call__(self, request):
        import asyncio

        from starlette.responses import JSONResponse, Response

        if self.kind == "metrics":
            text = await self.board.render.remote()
            return Response(text, media_type=METRICS_CONTENT_TYPE)
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        app = (await asyncio.to_thread(serve.status)).applications.get(self.app_name)
        deployment = app.deployments.get(DEPLOYMENT) if app is not None else None
        running = deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0
        if running:
            return {"status": "ok", "replicas": running}
        failed = app is not None and app.status == ApplicationStatus.DEPLOY_FAILED
        return JSONResponse({"status": "error" if failed else "loading", "replicas": 0}, status_code=503)


def _probe_app(kind: str, app_name: str):
    from ray import serve

    deployment = serve.deployment(name=f"{kind}-probe", num_replicas=1, max_ongoing_requests=1000,
                                  ray_actor_options={"num_cpus": 0})
    return deployment(Probe).bind(kind, app_name)


def application(spec: ModelSpec, model_name: str, server_options: dict, options: RayOptions, threads: int):
    """The Serve application: ``options``' replicas of ``Replica``, each on ``threads`` threads."""
    from ray import serve

    from ..config import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE

    settings = deployment_options(options, threads, server_options.get("max_batch") or DEFAULT_MAX_BATCH,
                                  server_options.get("max_queue", DEFAULT_MAX_QUEUE),
                                  server_options.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE_S))
    deployment = serve.deployment(name=DEPLOYMENT, **settings)
    return deployment(serve.ingress()(Replica)).bind(replace(spec, threads=threads), model_name, server_options)


def http_options(host: str, port: int, keep_alive: float) -> dict:
    """Serve's proxy settings (``serve.start(http_options=...)``); its keep-alive takes whole seconds."""
    return {"host": host, "port": port, "keep_alive_timeout_s": max(1, math.ceil(keep_alive))}


def start(spec: ModelSpec, model_name: str, server_options: dict, options: RayOptions, host: str, port: int,
          app_name: str = APP_NAME, keep_alive: float = DEFAULT_KEEP_ALIVE_S) -> int:
    """Start (or join) Ray, deploy the application behind Serve's proxy on ``host:port`` (idle
    connections closed after ``keep_alive`` seconds) and wait for every replica to load; returns
    the threads each replica runs on."""
    if options.address is None:
        local_only_environment()
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if not ray.is_initialized():
        kept = _signal_handlers()
        if options.address is None:
            ray.init(_node_ip_address=LOCAL_IP, include_dashboard=False, num_cpus=os.cpu_count(),
                     logging_level="warning", log_to_driver=False)
        else:
            ray.init(address=options.address, logging_level="warning", log_to_driver=False)
        for sig, handler in kept.items():  # ray.init installs a SIGTERM handler that aborts the process
            signal.signal(sig, handler)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if options.address is None and any(n["NodeManagerAddress"] != LOCAL_IP for n in nodes):
        raise RuntimeError(f"the local Ray instance is not on {LOCAL_IP} (was ray imported before "
                           "local_only_environment()?)")
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
    threads = default_threads(options, node_cpus)
    if options.address is None and options.fewest_replicas * threads > sum(node_cpus):
        raise SpecDecodeError("threads", f"{options.fewest_replicas} replica(s) x {threads} thread(s) need "
                                         f"{options.fewest_replicas * threads} CPUs; Ray has {sum(node_cpus)}")
    serve.start(http_options=http_options(host, port, keep_alive), proxy_location="HeadOnly")
    # the probes first: /health says ok once the replicas run, and by then no probe's process is
    # still starting (each takes seconds of a core, which the first requests would pay for)
    for kind in PROBES:  # Serve routes by the longest prefix: these paths go to the probes
        serve.run(_probe_app(kind, app_name), name=f"{app_name}-{kind}", route_prefix=f"/{kind}")
    serve.run(application(spec, model_name, server_options, options, threads), name=app_name, route_prefix="/")
    return threads


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) is not None}


def stop(options: RayOptions, grace: float, app_name: str = APP_NAME) -> None:
    """Take the application down within about ``grace`` seconds (replicas let running requests
    finish meanwhile); a local Ray instance goes too, a cluster keeps running."""
    import ray
    from ray import serve

    def down():
        if options.address is None:
            serve.shutdown()
        else:
            for name in (app_name, *(f"{app_name}-{kind}" for kind in PROBES)):
                serve.delete(name)
        try:
            ray.kill(ray.get_actor(f"metrics-{app_name}", namespace=BOARD_NAMESPACE))
        except ValueError:
            pass

    thread = threading.Thread(target=down, daemon=True)
    thread.start()
    thread.join(grace + HEALTH_CHECK_TIMEOUT_S)
    if options.address is None:
        ray.shutdown()


def serve_forever(spec: ModelSpec, model_name: str, server_options: dict, options: RayOptions, host: str,
                  port: int, keep_alive: float = DEFAULT_KEEP_ALIVE_S) -> None:
    """``specdecode serve --ray``: start, then serve until SIGINT or SIGTERM, then stop."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        try:
            threads = start(spec, model_name, server_options, options, host, port, keep_alive=keep_alive)
        except SpecDecodeError:
            raise
        except Exception as exc:  # a replica that cannot load: Serve's report ends with the replica's error
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise SpecDecodeError("ray", f"the replicas could not start: {lines[-1] if lines else exc}") from None
        scale = (f"{options.replicas or 1} replica(s)" if options.max_replicas is None
                 else f"{options.min_replicas}-{options.max_replicas} replicas")
        print(f"specdecode: serving {model_name} on Ray Serve, {scale} x {threads} thread(s), "
              f"on http://{host}:{port}", flush=True)
        done.wait()
    finally:
        stop(options, server_options.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE_S))
