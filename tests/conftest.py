"""Shared pytest set-up: small thread counts so tests behave the same on 2-core CI machines."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Real SeaweedFS / MLflow servers, one stack per session, started only by tests that ask for them.
from tests.fixtures_stack import local_stack, s3_store, stack_mlflow, stack_s3  # noqa: E402,F401
