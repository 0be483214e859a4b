"""The eastwest lab: several hosts and pods on one machine, in network namespaces, joined by a
VXLAN overlay, running a demo application that records its own ground truth. See docs/lab.md."""

from eastwest.lab.lab import Lab

__all__ = ["Lab"]
