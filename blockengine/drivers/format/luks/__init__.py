"""The LUKS1 format driver (QEMU's block/crypto.c over crypto/block-luks.c): driver.py."""
