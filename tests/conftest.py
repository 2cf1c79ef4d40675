"""Shared pytest set-up: small thread counts so tests behave the same on 2-core CI machines."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled") if os.environ.get("DENSENAS_TEST_RAY_AUTH") == "off" else None
