"""The qcow2 format driver package (QEMU's block/qcow2*.c split the same way).

layout    on-disk structures, flags and limits (qcow2.h)
cache     L2 / refcount block metadata caches (qcow2-cache.c)
refcount  refcount tables and cluster allocation (qcow2-refcount.c)
cluster   L1/L2 mapping, allocation, COW, zeroes, discard (qcow2-cluster.c)
compress  compressed cluster codecs (qcow2-threads.c)
snapshot  the snapshot table (qcow2-snapshot.c)
check     consistency check and leak repair (qcow2_check_refcounts)
create    image creation (qcow2_co_create)
driver    Qcow2Driver (qcow2.c)
"""
