"""Fixtures shared by the tier tests."""

from tests.redis_util import redis_cluster, redis_server  # noqa: F401  (throwaway standalone and cluster Redis)
