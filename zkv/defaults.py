"""Every default of every service, with its unit, in one place.

Each service flag reads its default from an environment variable (flag > environment > this
module), so one environment moves the whole cluster, under honcho or anywhere else.
"""

FRONTEND = "tcp://127.0.0.1:5555"  # ZKV_FRONTEND: clients (gateway, zkv client) <-> broker
BACKEND = "tcp://127.0.0.1:5556"  # ZKV_BACKEND: broker <-> workers
# ZKV_ADVERTISE: the address other hosts reach this one at. A broker without --frontend or
# --backend binds tcp://<advertise>:FRONTEND_PORT and :BACKEND_PORT, so one command line serves
# every host with only its environment changed. Not loopback: CURVE, or --insecure (README).
ADVERTISE = "127.0.0.1"
FRONTEND_PORT = 5555
BACKEND_PORT = 5556
# ZKV_EVENTS / ZKV_EVENTS_BACKEND: the broker's change events (issue 12, broker/events.py),
# bound at tcp://<advertise>:EVENTS_PORT (subscribers) and :EVENTS_BACKEND_PORT (workers).
EVENTS_PORT = 5557
EVENTS_BACKEND_PORT = 5558
SHARDS = 2  # ZKV_SHARDS

HTTP_HOST = "127.0.0.1"  # ZKV_HOST
HTTP_PORT = 5000  # PORT (honcho sets it)
HTTP_PROCESSES = 2  # ZKV_HTTP_PROCESSES: gunicorn worker processes
HTTP_WORKER = "event"  # ZKV_HTTP_WORKER: event (asyncio loop, batched calls) or gthread
HTTP_MAX_CONNECTIONS = 1000  # ZKV_HTTP_MAX_CONNECTIONS: per process, event worker only
# ZKV_HTTP_MAX_CONNECTIONS_PER_CLIENT: per process and client IP, event worker only; behind a
# reverse proxy every client shares its address: raise it to HTTP_MAX_CONNECTIONS there
HTTP_MAX_CONNECTIONS_PER_CLIENT = 100
# ZKV_HTTP_EVICT_AFTER: over a connection limit, the connection waiting longest on its client
# (unfinished request or idle keep-alive) is closed for the newcomer once it has waited this long
HTTP_EVICT_AFTER_S = 1.0
HTTP_FAST_LANE = True  # ZKV_HTTP_FAST_LANE: plain seed /get, /set, /delete without Bottle
HTTP_THREADS = 16  # ZKV_HTTP_THREADS: threads per process, each with its own ZeroMQ socket
MAX_KEY_BYTES = 1024  # ZKV_MAX_KEY_BYTES: largest key the gateway accepts
MAX_VALUE_BYTES = 1024 * 1024  # ZKV_MAX_VALUE_BYTES: largest value the gateway accepts
LIST_LIMIT = 100  # keys per page of GET /v1/keys unless ?limit= says otherwise
LIST_LIMIT_MAX = 1000

REQUEST_TIMEOUT_S = 5.0  # ZKV_TIMEOUT: the most a client request may take, retries included
ATTEMPT_TIMEOUT_S = 1.0  # a client resends a request (same id) after this long without reply
CONNECT_TIMEOUT_S = 1.5  # ZKV_CONNECT_TIMEOUT: how long a client tries an unreachable broker
SHARD_WAIT_S = 3.0  # ZKV_SHARD_WAIT: how long the broker holds requests for a shard with no owner
WORKER_REPLY_TIMEOUT_S = 4.0  # ZKV_WORKER_TIMEOUT: broker gives up on a dispatched request
# A worker's idempotency memory (workers/idempotency.py): every write of the window is
# remembered (a stamped retry older than it gets "outcome unknown"), within a bound in bytes.
IDEMPOTENCY_WINDOW_S = 15.0  # ZKV_IDEMPOTENCY_WINDOW: 1 to 86,400; covers a retry's 12 s reach
IDEMPOTENCY_MAX_BYTES = 256 * 1024 * 1024  # ZKV_IDEMPOTENCY_MAX_BYTES: per shard, estimated
# What the broker holds (requests admitted and not yet answered, waiting or at a worker), in
# request bytes (records as dispatched) and requests; more is answered BUSY (retry later).
MAX_PENDING_BYTES = 1024 * 1024 * 1024  # ZKV_MAX_PENDING_BYTES: all clients together
MAX_CLIENT_BYTES = 256 * 1024 * 1024  # ZKV_MAX_CLIENT_BYTES: one client socket
MAX_PENDING_OPS = 1_000_000  # ZKV_MAX_PENDING_OPS: requests, all clients together
MAX_CLIENT_OPS = 250_000  # ZKV_MAX_CLIENT_OPS: requests, one client socket
# ALL requests the broker has scattered to the shards and not yet answered (each gathers up to
# shards x MAX_REPLY_BYTES of entries, and costs every worker an encoding on its only loop);
# more is answered BUSY at once. Clients page: one ALL a page, so 1 is what a client needs.
MAX_PENDING_ALLS = 8  # ZKV_MAX_PENDING_ALLS: all clients together
MAX_CLIENT_ALLS = 2  # ZKV_MAX_CLIENT_ALLS: one client socket

HEARTBEAT_INTERVAL_S = 1.0  # ZKV_HEARTBEAT_INTERVAL
HEARTBEAT_LIVENESS = 3  # ZKV_HEARTBEAT_LIVENESS: intervals of silence before a peer is dead

WORKER_PROCESSES = 1  # ZKV_WORKER_PROCESSES: worker processes one `python -m workers` runs
DATA_DIR = "./data"  # ZKV_DATA_DIR: shard-<n>/ directories, relative to the current directory
KEYS_SUBDIR = "keys"  # ZKV_KEYS defaults to <ZKV_DATA_DIR>/keys: the cluster's CURVE keys
FSYNC = "always"  # ZKV_FSYNC: always | everysec | no, as Redis names them
# ZKV_DISK_RESERVE: bytes of free disk that SETs leave for DELs and compaction (a full disk)
DISK_RESERVE_BYTES = 16 * 1024 * 1024

EXPIRE_CYCLE_S = 0.05  # how often a worker looks for expired keys nobody read
EXPIRE_BUDGET_S = 0.002  # the most one expiry pass may take before requests run again

# Cluster mode (docs/cluster.md): set ZKV_COORDINATOR and the services coordinate through etcd.
COORDINATOR = ""  # ZKV_COORDINATOR: etcd client URLs, comma-separated; empty: one host, as ever
CLUSTER_NAME = "zkv"  # ZKV_CLUSTER_NAME: this cluster's keys live under /zkv/<name>/ in etcd
REPLICAS = 1  # ZKV_REPLICAS: followers per shard in cluster mode, at most MAX_REPLICAS
MAX_REPLICAS = 8
LEASE_TTL_S = 3  # ZKV_LEASE_TTL: whole seconds (etcd's unit); 1 to MAX_LEASE_TTL_S
MAX_LEASE_TTL_S = 300
REPLICA_LAG_S = 1.0  # ZKV_REPLICA_LAG: a follower silent or behind this long leaves the ISR
MAX_REPLICA_LAG_S = 60.0

# Change events (issue 12, docs/protocol.md): workers' PUB sockets connect to the broker's
# events backend (XSUB), subscribers (zkv watch, the gateway's /v1/watch) to its XPUB.
EVENTS = f"tcp://127.0.0.1:{EVENTS_PORT}"  # ZKV_EVENTS: the broker's XPUB, for subscribers
EVENTS_BACKEND = f"tcp://127.0.0.1:{EVENTS_BACKEND_PORT}"  # ZKV_EVENTS_BACKEND: its XSUB
