"""Everything that is not the daemon: the fleet simulator (`sim`), the benchmarks (`bench`),
`demo`, the cluster lab (`lab`) and the cluster's balancer. The daemon never imports them."""
