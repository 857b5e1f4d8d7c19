"""Node permissions, as in QEMU's block.c.

Every parent edge (BdrvChild) *takes* a set of permissions on its child and
*shares* another set with all other parents.  Attaching an edge, or changing one,
is refused when some other edge of the same child takes what this edge does not
share, or does not share what this edge takes.
"""
import enum


class Perm(enum.IntFlag):
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08
    GRAPH_MOD = 0x10

    @classmethod
    def all(cls) -> "Perm":
        return cls.CONSISTENT_READ | cls.WRITE | cls.WRITE_UNCHANGED | cls.RESIZE | cls.GRAPH_MOD


# QEMU's bdrv_perm_names() order and spelling; also the bit index used for file locks.
PERM_NAMES = [
    (Perm.CONSISTENT_READ, "consistent read"),
    (Perm.WRITE, "write"),
    (Perm.WRITE_UNCHANGED, "write unchanged"),
    (Perm.RESIZE, "resize"),
    (Perm.GRAPH_MOD, "change children"),
]


def perm_names(perm: Perm) -> str:
    """Comma-separated names, as bdrv_perm_names() prints them."""
    return ", ".join(name for bit, name in PERM_NAMES if perm & bit)


PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
UNCHANGED = Perm.all() & ~PASSTHROUGH


def filter_perms(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """bdrv_filter_default_perms(): pass the parents' use straight through."""
    return perm & PASSTHROUGH, (shared & PASSTHROUGH) | UNCHANGED


def default_child_perm(node, child, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """bdrv_default_perms(): what ``node`` needs on ``child`` for its parents' (perm, shared).

    Mirrors QEMU 7.2 so that image locks (derived from these) interoperate with QEMU.
    """
    from .child import ChildRole
    role = child.role
    if role & ChildRole.FILTERED:
        perm, shared = filter_perms(perm, shared)
    elif role & ChildRole.COW:
        # backing files are only read; others may write to them only if our users allow
        perm, shared = filter_perms(perm, shared)
        perm &= Perm.CONSISTENT_READ
        shared = (Perm.WRITE | Perm.RESIZE) if shared & Perm.WRITE else Perm(0)
        shared |= Perm.CONSISTENT_READ | Perm.GRAPH_MOD | Perm.WRITE_UNCHANGED
    else:
        perm, shared = filter_perms(perm, shared)
        if role & ChildRole.METADATA:
            if not node.read_only:
                perm |= Perm.WRITE | Perm.RESIZE
            if not node.no_io:
                perm |= Perm.CONSISTENT_READ
            shared &= ~(Perm.WRITE | Perm.RESIZE)
        if role & ChildRole.DATA:
            shared &= ~Perm.RESIZE
            if perm & Perm.WRITE_UNCHANGED:
                perm |= Perm.WRITE
            if perm & Perm.WRITE:
                perm |= Perm.RESIZE
    return perm, shared
