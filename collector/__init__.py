"""The eastwest collector: the per-host agent.

Stages, wired in `collector.pipeline`: sources (`collector.probes` eBPF socket probes,
`collector.vxlan` underlay capture and pcap files) -> enrichment -> batching/spool -> export
(stdout JSON lines, or the aggregator). Never talks to a store.
"""
