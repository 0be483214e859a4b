"""Packets the kernel drops, with its reason (skb:kfree_skb): collector/drops/kernel.py loads the probe, collector/drops/source.py turns its counts into records."""
