"""eastwest: network observability for east-west (service-to-service) traffic.

The shared core: the flow record model and its wire codec (`record`, `codec`), the error tree
(`errors`), the `eastwest` command (`cli`) and the test lab (`lab`). It never imports `collector`
or `aggregator` at module level.
"""

__version__ = "0.1.0"
