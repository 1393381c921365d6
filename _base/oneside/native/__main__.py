"""``python -m oneside.native``: build the NVSHMEM shim ahead of time and print its path."""
from . import build

print(build(verbose=True))
