"""LUKS option lists other formats embed (qcow2 lists them with the "encrypt." prefix).

A module of its own so qcow2 can list them without loading the LUKS driver and its
ciphers (the ``cryptography`` bindings) at start-up.
"""
from __future__ import annotations

from ...base import CreateOpt

# block_crypto_amend_opts_luks (qcow2 lists them with the "encrypt." prefix)
AMEND_OPTS = (
    CreateOpt("state", "str", "Select new state of affected keyslots (active/inactive)"),
    CreateOpt("keyslot", "num", "Select a single keyslot to modify explicitly"),
    CreateOpt("old-secret", "str", "Select all keyslots that match this password"),
    CreateOpt("new-secret", "str",
              "New secret to set in the matching keyslots. Empty string to erase"),
    CreateOpt("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
)
