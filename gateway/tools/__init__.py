"""Operator tools that run beside the gateway, on hosts of their own (the cluster's balancer).
The daemon never imports them."""
