"""Disk-encryption building blocks (QEMU's crypto/): sector ciphers with IV generators,
PBKDF2 and LUKS1's anti-forensic splitter, and the LUKS1 block format itself.

Every primitive comes from the ``cryptography`` package; this layer only arranges
them as QEMU does (sector numbering, IV derivation, key-slot layout).  It knows
nothing about block nodes: the LUKS format driver and (later) qcow2's
``encrypt.format=luks`` both drive ``luks.LuksBlock`` through read/write callbacks.
"""
