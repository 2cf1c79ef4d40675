"""``python -m densenas.native [-v]``: compile the native kernels now (``make`` runs it at set-up), so the
first search does not wait for the compiler. A failed build is reported, not fatal: aten's ops are used."""
import sys

from densenas.native import build_all

if __name__ == "__main__":
    build_all(verbose="-v" in sys.argv[1:])
