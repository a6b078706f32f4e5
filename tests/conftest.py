import os

from redis_fixture import redis_server  # noqa: F401

# Tests never reach a model hub: every checkpoint is made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
