"""imgstore: immutable, content-addressed generations of network-booted root filesystems.

The library is usable without the CLI: Store.open(), commit.commit(), checkout.restore(), verify.verify().
"""

__version__ = "0.1.0"
