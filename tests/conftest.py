"""Shared pytest set-up: small thread counts so tests behave the same on 2-core CI machines."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
