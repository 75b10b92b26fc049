"""The rq worker entry point: one process serving every queue of the project.

Queues, in priority order: `persist` (turns left unpersisted), `memory`
(long-term memory extraction), `audit` (semantic-cache audits). Each worker
also runs a small ticker that enqueues the persistence sweep every
SWEEP_INTERVAL_SECONDS; a `SET NX EX` on `persist-sweep-tick` makes sure only
one worker of many enqueues it per interval. The same ticker enqueues the
hourly retention sweep (workers.retention: old `cache_audits` rows, and the
privacy sweep of workers.privacy: history retention, tombstones, unfinished
erasures) on `persist` (`retention-sweep-tick`). And a dispatcher: the app marks a
session due for memory extraction after each turn (`memory-due`); the
dispatcher enqueues those sessions' jobs (`app.memory.queue.dispatch_due`),
one pass every DISPATCH_SECONDS (at once again after a full batch). Several
workers may pass over the same marks; rq's one-waiting-job-per-session rule
keeps that to one job.
A burst worker dispatches what is due before it works.

Redis outages. rq's `Worker.work()` retries a lost connection only while it
waits for a job; anywhere else (a heartbeat, maintenance) it logs "unhandled
exception, quitting" and its teardown then dies on the same ConnectionError.
So `run_worker` wraps it: when `work()` ends while Redis is unreachable, it
waits for Redis with capped backoff (one log line per outage, one when it is
back) and starts a fresh `Worker` under a new name (the old one's registration
cannot be cleared while Redis is down). A job interrupted by the outage stays
in rq's StartedJobRegistry; rq's maintenance finds it abandoned and retries it
per its `Retry` policy. A worker started while Redis is down waits the same way.

Worker class (WORKER_CLASS). `fork` (default) forks one rq work horse per job;
`simple` runs each job in the worker process itself: no fork per job (rq's fork
cost about 70 ms of CPU a turn,
bench/turn_cpu.py), and the warm model, its thread and imported modules serve
every job. A job that raises is failed or retried per its `Retry` as with
`fork` (same rq code path); a job past its `job_timeout` is stopped by rq's
SIGALRM death penalty in the worker's main thread. What `simple` gives up: a
job stuck inside C code that never returns to Python (not one of ours: they
wait on sockets, which the alarm interrupts) is not bounded, and a job that
kills its process (segfault, OOM) takes the worker with it; the supervisor
restarts it and rq's registry cleanup retries the job, as for a killed worker.
`fork` keeps rq's work horse per job (the parent SIGKILLs a horse past its timeout).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.executions import Execution
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.worker import WorkerStatus

from app.memory.queue import DISPATCH_BATCH, dispatch_all, dispatch_due
from app.ops import metrics
from app.settings import Settings
from app.stores import keys
from app.stores.clients import redis_client
from workers.retention import RETENTION_SWEEP_SECONDS

QUEUES = ("persist", "memory", "audit")
# rq's own retry while dequeuing doubles up to this; its default (60 s) would keep
# a worker idle for up to a minute after Redis came back.
MAX_RECONNECT_WAIT_SECONDS = 5.0
# WORKER_CLASS=simple: how often a running job's heartbeat is renewed, when a job
# whose worker died counts as abandoned, and how often the worker looks for those.
HEARTBEAT_SECONDS = 5
HEARTBEAT_TTL_SECONDS = 15
MAINTENANCE_SECONDS = 15
# The pause between the dispatcher's passes over the sessions due for memory
# extraction: the most a turn's extraction waits for its job to be queued.
DISPATCH_SECONDS = 0.25
DISPATCH_SOCKET_TIMEOUT = 10.0
log = logging.getLogger("backbone.worker")


def queue(settings: Settings, name: str, connection: redis.Redis | None = None) -> Queue:
    return Queue(name, connection=connection or redis_client(settings.redis_url or ""))


def enqueue_sweep_if_due(settings: Settings, connection: redis.Redis) -> bool:
    """Enqueue one sweep unless another worker did within this interval."""
    if not connection.set(keys.SWEEP_TICK, "1", nx=True, ex=settings.sweep_interval_seconds):
        return False
    queue(settings, "persist", connection).enqueue(
        "workers.jobs.sweep_unpersisted", job_timeout=300, result_ttl=600, failure_ttl=86400
    )
    return True


def enqueue_retention_if_due(settings: Settings, connection: redis.Redis) -> bool:
    """Enqueue one retention sweep (workers.retention) per RETENTION_SWEEP_SECONDS
    over all workers."""
    if not connection.set(keys.RETENTION_TICK, "1", nx=True, ex=RETENTION_SWEEP_SECONDS):
        return False
    queue(settings, "persist", connection).enqueue(
        "workers.retention.sweep", job_timeout=300, result_ttl=600,
        failure_ttl=86400,
    )
    return True


def _ticker(settings: Settings, stop: threading.Event) -> None:
    conn = redis_client(settings.redis_url or "")
    failing = False
    while not stop.wait(min(5, settings.sweep_interval_seconds)):
        try:
            enqueue_sweep_if_due(settings, conn)
            enqueue_retention_if_due(settings, conn)
            failing = False
        except redis.RedisError as e:
            if not failing:  # once per outage, not every tick
                log.warning("could not enqueue the persistence sweep: %s", e)
            failing = True


def _dispatcher(settings: Settings, stop: threading.Event) -> None:
    # A bounded read: a Redis that stops answering (paused, a half-open connection)
    # must not park the thread, and with it every session's extraction, for good.
    conn = redis_client(settings.redis_url or "", socket_timeout=DISPATCH_SOCKET_TIMEOUT)
    failing = False
    while not stop.is_set():
        try:
            cleared = dispatch_due(conn)
            failing = False
        except Exception as e:  # a thread that died here would leave every session unmined
            if not failing:  # once per outage
                log.warning("could not queue memory extraction for due sessions: %s", e,
                            exc_info=not isinstance(e, redis.RedisError))
            failing, cleared = True, 0
        # A pause even after a pass that queued something: marks gather (a session's
        # several turns become one job) and each pass's reads serve more of them.
        if cleared < DISPATCH_BATCH and stop.wait(DISPATCH_SECONDS if not failing else 1.0):
            return


def redis_answers(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.ResponseError:
        return False  # -LOADING: the AOF is being replayed


def wait_for_redis(conn: redis.Redis, stop: threading.Event, *, what: str = "Redis") -> bool:
    """Block until Redis answers PING (True) or `stop` is set (False).

    Backoff doubles from 0.2 s to MAX_RECONNECT_WAIT_SECONDS; logs once when the
    wait starts and once when Redis is back.
    """
    if redis_answers(conn):
        return True
    started = time.monotonic()
    log.warning("%s is unreachable: waiting for it (retrying with backoff)", what)
    delay = 0.2
    while not stop.wait(delay):
        if redis_answers(conn):
            log.warning("%s is back after %.1f s", what, time.monotonic() - started)
            return True
        delay = min(delay * 2, MAX_RECONNECT_WAIT_SECONDS)
    return False


class _OneLinePerOutage(logging.Filter):
    """Keep the first of rq's per-retry "could not connect" lines, drop the rest.

    rq logs one per retry while dequeuing; retries come at most
    MAX_RECONNECT_WAIT_SECONDS apart, so a longer silence starts a new outage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if "could not connect to Redis" not in str(record.msg):
            return True
        now = time.monotonic()
        first = now - self.last > 2 * MAX_RECONNECT_WAIT_SECONDS + 1
        self.last = now
        return first


def _stop_on_signals(stop: threading.Event) -> None:
    """While no rq Worker is running, SIGINT/SIGTERM end the wait (rq installs its own)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class _Scheduler(RQScheduler):
    """rq's scheduler process, whose pause between passes ends at its SIGTERM.

    rq's own sleeps out the rest of its interval (up to 1 s) before it stops, and
    the worker's stop joins it: that pause was most of an idle worker's stop.
    """

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._stop_requested = True
        self._woken.set()  # runs in the scheduler's main thread, between its waits

    def work(self) -> None:
        # rq 3.0's RQScheduler.work with an Event's wait for its time.sleep.
        rq: Any = self  # RQScheduler is untyped
        self._woken = threading.Event()  # made in the forked process, not its parent
        rq._install_signal_handlers()
        rq.register_birth()
        while not self._stop_requested:
            if self.should_reacquire_locks:
                rq.acquire_locks()
            rq.heartbeat()
            rq.enqueue_scheduled_jobs()
            self._woken.wait(self.interval)
        rq.stop()


class _StopFlag:
    """Tells us when a signal asked rq's worker to stop (rq keeps no public flag),
    and runs our `_Scheduler` for rq's."""

    stop_event: threading.Event

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_event.set()
        super().request_stop(signum, frame)  # type: ignore[misc]

    def _install_signal_handlers(self) -> None:
        # A signal between run_worker's last look at the stop and this install reached
        # our handler, not rq's: without this rq would block in its dequeue regardless.
        super()._install_signal_handlers()  # type: ignore[misc]
        if self.stop_event.is_set():
            worker: Any = self
            worker._stop_requested = True  # rq's loop checks it before each dequeue

    def unsubscribe(self) -> None:
        # rq sends UNSUBSCRIBE, then stops its pubsub thread with no timeout: when the
        # thread reads that reply before the stop, it waits in its next get_message for
        # up to a minute, and the worker's exit with it (`up` killed it after 15 s, most
        # of a 17 s Ctrl-C). Stopping the thread first makes that reply its last wake-up.
        worker: Any = self
        thread = worker.pubsub_thread
        if thread is None:
            return
        log.debug("worker %s: unsubscribing from %s", worker.name, worker.pubsub_channel_name)
        thread.stop(timeout=0)  # only clears its flag: the reply below wakes it to exit
        worker.pubsub.unsubscribe()
        thread.join(timeout=5)
        worker.pubsub.close()

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO",
                         date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                         log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
        # rq 3.0's Worker._start_scheduler with _Scheduler for RQScheduler. Should a later
        # rq rename it, rq's own scheduler runs: the stop is slower, nothing else changes.
        worker: Any = self
        scheduler: Any = _Scheduler(
            worker.queues, connection=worker.connection, logging_level=logging_level or "INFO",
            date_format=date_format, log_format=log_format, serializer=worker.serializer)
        worker.scheduler = scheduler
        scheduler.acquire_locks()
        if not scheduler.acquired_locks:
            return
        if not burst:
            scheduler.start()
            return
        try:
            scheduler.register_birth()
            scheduler.enqueue_scheduled_jobs()
        finally:
            scheduler.release_locks()
            scheduler.register_death()


class _ForkWorker(_StopFlag, Worker):
    """rq's Worker: one forked work horse per job."""


class _SimpleWorker(_StopFlag, SimpleWorker):
    """rq's SimpleWorker: each job in this process, bounded by rq's SIGALRM timeout.

    rq's SimpleWorker beats no heartbeat while a job runs, so it announces one of
    job_timeout + 60 s: a worker SIGKILLed mid-job left its job looking alive that
    long (a forked horse would usually finish it, orphaned). Here a thread beats
    every HEARTBEAT_SECONDS, the announced lapse is HEARTBEAT_TTL_SECONDS, and
    registries are cleaned every MAINTENANCE_SECONDS: a killed worker's job is
    found abandoned and retried per its `Retry` within about half a minute.
    """

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return HEARTBEAT_TTL_SECONDS

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done),
                                name="rq-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.RedisError as e:  # an outage: the job itself will notice
                log.debug("heartbeat of job %s failed: %s", job.id, e)


WORKER_CLASSES: dict[str, type[_ForkWorker] | type[_SimpleWorker]] = {
    "fork": _ForkWorker, "simple": _SimpleWorker,
}


def run_worker(settings: Settings, *, burst: bool = False, dims: int | None = None) -> bool:
    """Serve the queues until Ctrl-C / SIGTERM (or, with burst, until they are empty).

    Waits for Redis first, then prepares the stores (`app.bootstrap.prepare`), so a
    worker started while Redis is down waits for it instead of exiting.
    """
    from app.embeddings import warm
    from app.stack.bootstrap import prepare

    # Jobs read Settings.from_env() in the work horse: hand them the resolved stores.
    os.environ["REDIS_URL"] = settings.redis_url or ""
    os.environ["DATABASE_URL"] = settings.database_url or ""
    conn = redis_client(settings.redis_url or "")
    qs = [queue(settings, name, conn) for name in QUEUES]
    logging.getLogger("rq.worker").addFilter(_OneLinePerOutage())
    stop = threading.Event()
    if not burst:
        threading.Thread(target=_ticker, args=(settings, stop), daemon=True).start()
    worked = False
    try:
        _stop_on_signals(stop)
        if not wait_for_redis(conn, stop):
            return worked
        prepare(settings, dims)
        # Loaded once here: jobs run in this process (simple) or in forks of it (fork).
        warm(settings)
        if settings.worker_metrics_port and not burst:
            # Its own /metrics, for a worker the app's /metrics cannot read (compose).
            metrics.serve_own(settings.worker_metrics_port)
        if burst:
            dispatch_all(conn)
        else:
            threading.Thread(target=_dispatcher, args=(settings, stop), daemon=True,
                             name="memory-dispatch").start()
        worker_class = WORKER_CLASSES[settings.worker_class]
        for generation in range(1_000_000):
            _stop_on_signals(stop)
            # A signal that came while the model loaded: rq's own handlers, installed
            # by work(), would never hear of it.
            if stop.is_set() or not wait_for_redis(conn, stop):
                return worked
            name = f"backbone-{socket.gethostname()}-{os.getpid()}-{generation}"
            worker = (_SimpleWorker(qs, connection=conn, name=name,
                                    maintenance_interval=MAINTENANCE_SECONDS)
                      if worker_class is _SimpleWorker
                      else _ForkWorker(qs, connection=conn, name=name))
            worker.stop_event = stop
            worker.max_connection_wait_time = MAX_RECONNECT_WAIT_SECONDS
            try:
                worked = worker.work(burst=burst, with_scheduler=True) or worked
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # rq's teardown could not register the death: the outage is still on.
                log.warning("worker %s lost Redis (%s); starting over once it is back", name, e)
            if burst or stop.is_set():
                return worked
            # Not burst and not asked to stop: rq quit on an error (a Redis blip that
            # may already be over, or a bug). Start over after a pause, never in a spin.
            log.warning("worker %s quit unexpectedly; starting a new one", name)
            if stop.wait(1.0):
                return worked
        return worked
    finally:
        stop.set()
