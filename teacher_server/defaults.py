"""Defaults of the teacher server's configs (engine.EngineConfig, batcher.BatcherConfig,
serve.ServerConfig), in a module that imports nothing: `distillery teacher serve --help` shows them
without loading torch, and the configs and the command line cannot drift apart."""

DEFAULT_PORT = 50051  # gRPC
HOST = "127.0.0.1"  # loopback unless the operator says otherwise
DEVICE = "cpu"
DTYPE = "float32"
MAX_BATCH_TOKENS = 16384  # tokens in one engine call; the engine's score micro-batches pad to it too
MAX_BATCH_REQUESTS = 64  # 1 turns batching off
MAX_WAIT_MS = 5.0  # longest a request waits for company, ms
MAX_QUEUE = 256  # requests waiting; more are refused
MAX_QUEUE_PER_JOB = 128  # requests one job may have waiting, so a flooding job leaves room for others
TOP_K_LIMIT = 128  # largest top_k a request may ask for
MAX_FULL_ROW_POSITIONS = 4096  # positions per request that may ask for full rows
MAX_MESSAGE_MB = 256  # largest reply, MiB
MAX_REQUEST_MB = 32  # largest request, MiB
RPC_THREADS = 128
GRACE_S = 30.0  # in-flight calls get this long after SIGTERM
DRAIN_DELAY_S = 0.5  # NOT_SERVING is visible this long before the port closes
