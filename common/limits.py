"""Size caps on what a client publishes: one place for the package reader (common/package.py) and
the wire protocol (common/wire.py). No imports, so either side loads it for free."""

MAX_PACKAGE_BYTES = 256 * 1024 * 1024   # default cap on a package (file or wire payload)
MAX_HEADER_BYTES = 1024 * 1024          # the metadata document
MAX_ARRAYS = 4096                       # tensors in one wire reply
