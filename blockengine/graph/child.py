"""Edges of the node graph: a parent uses a child node in a role, with permissions."""
import enum

from .._record import factory, record
from .perms import Perm


class ChildRole(enum.IntFlag):
    """QEMU's BdrvChildRole: what a parent keeps in a child."""
    DATA = 0x01
    METADATA = 0x02
    FILTERED = 0x04
    COW = 0x08
    PRIMARY = 0x10

    # the usual combinations
    @classmethod
    def image(cls) -> "ChildRole":
        return cls.DATA | cls.METADATA | cls.PRIMARY


@record(eq=False)
class BdrvChild:
    """One parent -> child edge.  ``parent`` is a BlockNode or a BlockBackend."""
    name: str                # 'file', 'backing', 'data-file', 'children.0', 'root'
    role: ChildRole
    parent: object
    node: object             # the child BlockNode
    perm: Perm = Perm(0)
    shared: Perm = factory(Perm.all)

    def user_desc(self) -> str:
        """How QEMU names the user of this edge in permission errors."""
        return self.parent.parent_desc()
